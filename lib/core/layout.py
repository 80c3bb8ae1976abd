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
    def salf_pooled(self) -> Path:
        """sparse (Table 1 baselines): the bottleneck layer's average-pooled features (N, C) of every image."""
        return self.salf / "pooled.zarr"

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

    # every concept method
    def method_dir(self, method: str) -> Path:
        """data/<name>/<method>/: a method's own outputs (salf, fact, cefam)."""
        return self.root / method

    def concept_stats(self, method: str) -> Path:
        """Per-image presence and contribution of every concept (lib/core/schema.py), read by `stats`."""
        return self.method_dir(method) / "concept_stats.zarr"

    # CE-FAM
    @property
    def cefam(self) -> Path:
        return self.method_dir("cefam")

    @property
    def cefam_pooled(self) -> Path:
        """translator: z_cat, the pooled features of cefam.layers (N, sum C) fp16."""
        return self.cefam / "pooled.zarr"

    @property
    def cefam_translator(self) -> Path:
        """translator: the trained h, its layers and concept list (torch, weights_only-loadable)."""
        return self.cefam / "translator.pt"

    @property
    def cefam_regions(self) -> Path:
        """regions: S^t, association scores and region maps of every image of evaluate.split."""
        return self.cefam / "regions.zarr"

    @property
    def cefam_explain(self) -> Path:
        """regions: explanation PNGs (concepts, regions, contributions)."""
        return self.cefam / "explain"

    def cefam_metrics(self, stage: str) -> Path:
        """metrics/cefam.json (translator) and metrics/cefam_regions.json (regions)."""
        return self.metrics / ("cefam.json" if stage == "translator" else f"cefam_{stage}.json")

    def cefam_plot(self, name: str) -> Path:
        """Plot data of CE-FAM: "translator" (loss per epoch)."""
        return self.metrics / "plots" / f"cefam_{name}.csv"

    # FaCT
    @property
    def fact(self) -> Path:
        return self.method_dir("fact")

    @property
    def fact_vectors(self) -> Path:
        """sae_data: the SAE's training vectors (M, C) fp16 with their image and position."""
        return self.fact / "sae_data.zarr"

    @property
    def fact_sae(self) -> Path:
        """sae: the trained bias-free TopK SAE, its layer and backbone (torch, weights_only-loadable)."""
        return self.fact / "sae.pt"

    def fact_checkpoint(self, fingerprint: str) -> Path:
        """sae: the resumable training checkpoint of one configuration, in the scratch area (outside every DVC output)."""
        return self.scratch(self.fact / f"sae_checkpoint-{fingerprint}.pt")

    @property
    def fact_matching(self) -> Path:
        """contributions: SAE latent matched to each ground-truth concept on val, with its score (JSON)."""
        return self.fact / "matching.json"

    @property
    def fact_c2(self) -> Path:
        """contributions: the C²-Score per concept (images, C², spatial extent; parquet)."""
        return self.fact / "c2.parquet"

    @property
    def fact_explain(self) -> Path:
        """fact_explain: explanation PNGs and concept galleries."""
        return self.fact / "explain"

    @property
    def fact_metrics(self) -> Path:
        return self.metrics / "fact.json"

    @property
    def fact_sae_metrics(self) -> Path:
        """sae: the kept SAE's figures on val (spliced accuracy, loss, fve, reconstruction L2 error)."""
        return self.metrics / "fact_sae.json"

    def fact_plot(self, name: str) -> Path:
        """Plot data of FaCT: "sae" (training loss per step), "c2" (histogram of the concepts' C², with c2 and c2_random)."""
        return self.metrics / "plots" / f"fact_{name}.csv"

    @property
    def counterfactuals(self) -> Path:
        """counterfactuals: each present concept's true effect on every explained model (toy world; Zarr)."""
        return self.root / "counterfactuals.zarr"

    # stats
    @property
    def stats(self) -> Path:
        """Tables of every method's concept statistics: concepts, per_class, top_images (.parquet)."""
        return self.root / "stats"

    @property
    def stats_metrics(self) -> Path:
        return self.metrics / "stats.json"

    def stats_plot(self, name: str) -> Path:
        """Plot data of stats: "coverage" (FaCT's coverage curve per method)."""
        return self.metrics / "plots" / f"stats_{name}.csv"

    # toy world models (not per dataset)
    @property
    def toy_metrics(self) -> Path:
        return self.metrics / "toy_models.json"

    def toy_plot(self, name: str) -> Path:
        """Learning curves of the toy models: "toy_backbone", "toy_clip"."""
        return self.metrics / "plots" / f"{name}.csv"

    # compare
    @property
    def compare_metrics(self) -> Path:
        """compare: every method's causal fidelity and the other stages' figures, side by side (JSON)."""
        return self.metrics / "compare.json"

    @property
    def compare_table(self) -> Path:
        """compare: the same as a Markdown table."""
        return self.metrics / "compare.md"

    @property
    def compare_figures(self) -> Path:
        """compare: side-by-side PNGs of a sample of images and index.html."""
        return self.root / "compare"

    @property
    def compare_scatter(self) -> Path:
        """Plot data: each method's contribution against the concept's true effect (a sample of pairs)."""
        return self.metrics / "plots" / "compare_scatter.csv"

    def compare_curve(self, level: str, kind: str) -> Path:
        """Plot data: each method's mean deletion or insertion curve at the "concept" or "pixel" level."""
        return self.metrics / "plots" / f"compare_{level}_{kind}.csv"

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
