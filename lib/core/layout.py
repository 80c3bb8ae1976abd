"""Where each stage reads and writes, derived from params (dvc.yaml uses the same paths)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib.core.params import Params

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """Paths of one dataset's pipeline outputs under ``data/<name>/``."""

    root: Path
    metrics: Path = Path("metrics")  # small metrics and plot data, committed to git (not per dataset)

    @classmethod
    def from_params(cls, params: Params, base: Path = Path("data")) -> Layout:
        return cls(base / params.data.name)

    def scratch(self, path: Path) -> Path:
        """Where the store `path` is built before it is published: under ``data/<name>/.partial/``,
        outside every stage's DVC outputs (see lib/core/stores.py)."""
        return self.root / ".partial" / path.relative_to(self.root)

    # prepare
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def images(self) -> Path:
        """Per-image arrays: images, labels, and where known ground-truth concept masks."""
        return self.root / "images.zarr"

    @property
    def dataset_info(self) -> Path:
        """Class names, concept names/types and (toy world) class rules, as JSON."""
        return self.root / "dataset.json"

    @property
    def bad_images(self) -> Path:
        return self.root / "bad_images.txt"

    @property
    def preview(self) -> Path:
        return self.root / "preview.png"

    # extraction
    def features(self, layer: str) -> Path:
        return self.root / "features" / f"{layer}.zarr"

    @property
    def logits(self) -> Path:
        return self.root / "features" / "logits.zarr"

    @property
    def clip_images(self) -> Path:
        """Plain-image CLIP embeddings (N, D) (and later dense tokens)."""
        return self.root / "clip_images.zarr"

    @property
    def circles(self) -> Path:
        return self.root / "circles.zarr"

    @property
    def concepts(self) -> Path:
        """Kept concepts: text embeddings (M, D) and names/types/prompts (a Zarr store)."""
        return self.root / "concepts"

    @property
    def concepts_report(self) -> Path:
        """Every listed concept with its prompt and, if the filters dropped it, why (TSV)."""
        return self.root / "concepts.tsv"

    @property
    def similarity(self) -> Path:
        return self.root / "similarity.zarr"

    # SALF-CBM
    @property
    def salf(self) -> Path:
        return self.root / "salf"

    @property
    def salf_bottleneck(self) -> Path:
        """cbl: the trained, concept-filtered bottleneck (torch state, weights_only-loadable)."""
        return self.salf / "bottleneck.pt"

    @property
    def salf_concepts(self) -> Path:
        """cbl: kept and dropped concepts with their val cos^3 scores (JSON)."""
        return self.salf / "concepts.json"

    @property
    def salf_activations(self) -> Path:
        """sparse: pooled concept activations c* (N, M) of every image."""
        return self.salf / "activations.zarr"

    @property
    def salf_classifier(self) -> Path:
        """sparse: pooling, train standardisation, sparse and dense final layers, the lambda path."""
        return self.salf / "classifier.pt"

    @property
    def salf_metrics(self) -> Path:
        return self.metrics / "salf.json"

    def salf_figure(self, name: str) -> Path:
        """SALF-CBM training figures: "cbl_loss" (cbl), "path" (sparse)."""
        return self.salf / f"{name}.png"

    def salf_plot(self, name: str) -> Path:
        """Plot data of SALF-CBM: "cbl_train", "cbl_val" (loss curves), "path" (accuracy vs nonzeros)."""
        return self.metrics / "plots" / f"salf_{name}.csv"

    @property
    def explain(self) -> Path:
        return self.root / "explain"

    @property
    def explain_adhoc(self) -> Path:
        """Explanations of user-chosen images (`explain --index/--image`): outside the DVC-tracked folder."""
        return self.root / "explain_adhoc"

    # toy world models (not per dataset)
    @property
    def toy_metrics(self) -> Path:
        return self.metrics / "toy_models.json"

    def toy_plot(self, name: str) -> Path:
        """Learning curves of the toy models: "toy_backbone", "toy_clip"."""
        return self.metrics / "plots" / f"{name}.csv"

    # evaluate
    @property
    def evaluate_metrics(self) -> Path:
        return self.metrics / "evaluate.json"

    @property
    def evaluate_summary(self) -> Path:
        return self.metrics / "summary.md"

    @property
    def iou_curves(self) -> Path:
        """Plot data: mean IoU of the top-n% of each map against n, per method."""
        return self.metrics / "plots" / "iou_curves.csv"

    @property
    def accuracy_path(self) -> Path:
        """Plot data: accuracy against nonzero weights per class along sparsity paths."""
        return self.metrics / "plots" / "accuracy_nonzeros.csv"
