"""The explain stage's work: one PNG + JSON explanation per image, and a gallery of the
top-activating test images of randomly drawn concepts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from lib.core.layout import Layout
from lib.core.outputs import write_figure, write_json
from lib.core.params import ExplainParams, Params
from lib.core.stores import open_store
from lib.core.streams import batch_source
from lib.methods.salf.artifacts import SalfModel
from lib.methods.salf.data import splits_of
from lib.methods.salf.explain import explain_batch, top_activating
from lib.methods.salf.figures import explanation_figure, gallery_figure
from lib.methods.salf.images import Inputs, load_inputs, row_images
from lib.models.classes import ClassMap, read_class_map

__all__ = ["ExplainReport", "default_rows", "run_explain", "write_explanations", "write_gallery"]


@dataclass(frozen=True)
class ExplainReport:
    out_dir: Path
    records: dict[str, dict]  # image name -> its explanation record
    gallery: list[str] | None = None  # concepts shown in the gallery (stage run only)

    def summary(self) -> str:
        def shown(r: dict) -> str:  # SALF-CBM's prediction, then the backbone's own (absent with backbone.new_head)
            return r["predicted_name"] + (f" (backbone: {r['backbone_predicted_name']})" if r["backbone_predicted_name"] else "")

        predictions = ", ".join(f"{name}: {shown(r)}" for name, r in self.records.items())
        gallery = f"; gallery of {', '.join(self.gallery)}" if self.gallery else ""
        return f"{len(self.records)} images -> {self.out_dir} ({predictions}){gallery}"


def _chw(images: np.ndarray) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], for the figures."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def default_rows(test_rows: np.ndarray, n_images: int, seed: int) -> list[int]:
    """A seeded sample of `n_images` test rows (all of them if there are fewer), sorted."""
    count = min(n_images, len(test_rows))
    return sorted(np.random.default_rng(seed).choice(test_rows, size=count, replace=False).tolist())


def write_explanations(
    model: SalfModel,
    inputs: Inputs,
    class_map: ClassMap | None,
    out_dir: Path,
    *,
    top_k: int,
    class_index: int | None = None,
) -> ExplainReport:
    """Explain B images and write `<name>.png` and `<name>.json` per image: SALF-CBM's prediction, the
    top-k nonzero contributions and their heatmaps for it (or for `class_index`), and the backbone's
    own prediction among the outputs the dataset's classes map onto (None with backbone.new_head)."""
    images, maps, names = inputs.images, inputs.maps, inputs.names
    if len(names) != images.shape[0] or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"need one name and one map stack per image: {len(names)} names, {maps.shape[0]} maps, {images.shape[0]} images"
        )
    if tuple(images.shape[1:3]) != model.registration.image_size:
        raise ValueError(f"images are {images.shape[1:3]} but the bottleneck was trained on {model.registration.image_size}")
    k = min(top_k, maps.shape[1])
    result = explain_batch(model.classifier, maps, model.registration, k=k, classes=class_index)
    pictures = _chw(images)
    backbone = None if class_map is None else class_map.predict(inputs.backbone_logits).tolist()
    records = {}
    for i, name in enumerate(names):
        record = result.record(i, model.classifier)
        record["backbone_predicted"] = None if backbone is None else backbone[i]
        record["backbone_predicted_name"] = None if backbone is None else model.classifier.class_names[backbone[i]]
        # a sparse class row has fewer than k nonzero weights: zero contributions explain nothing
        shown = [j for j, c in enumerate(record["concepts"]) if c["contribution"] != 0] or [0]
        record["concepts"] = [record["concepts"][j] for j in shown]
        write_json(out_dir / f"{name}.json", record)
        write_figure(out_dir / f"{name}.png", explanation_figure(pictures[i], record, result.heatmaps[i, shown].cpu()))
        records[name] = record
    return ExplainReport(out_dir, records)


@torch.no_grad()
def write_gallery(
    model: SalfModel, layout: Layout, rows: np.ndarray, params: ExplainParams, path: Path, batch_size: int = 256
) -> list[str]:
    """Top-activating images (by standardised c*) among store `rows` for explain.gallery_concepts
    concepts drawn at random (seeded); writes the figure to `path` and returns the concepts."""
    features = open_store(layout.features(model.layer))["features"]
    device = model.bottleneck.conv.weight.device
    rows = np.sort(rows)  # the stream's order: top_activating counts positions in it
    source = batch_source({"features": features}, rows, batch_size, device=device)
    activations = (model.classifier.activations(model.concept_maps(block["features"])) for block in source())
    values, positions = top_activating(activations, min(params.gallery_images, len(rows)))
    names = model.classifier.concept_names
    count = min(params.gallery_concepts, len(names))
    chosen = torch.from_numpy(np.sort(np.random.default_rng(params.seed).choice(len(names), size=count, replace=False)))
    picked = positions[chosen.to(positions.device)].cpu()  # (C, n) positions in `rows`
    pictures = _chw(row_images(layout, rows[picked.flatten().numpy()]))
    concepts = [names[m] for m in chosen.tolist()]
    stack = pictures.view(*picked.shape, *pictures.shape[1:])
    write_figure(path, gallery_figure(stack, concepts, values[chosen.to(values.device)].cpu()))
    return concepts


def run_explain(
    config: Params,
    layout: Layout,
    device: torch.device,
    progress: Progress | None = None,
    *,
    indices: Sequence[int] = (),
    paths: Sequence[Path] = (),
    class_index: int | None = None,
    out_dir: Path | None = None,
) -> ExplainReport:
    """Explain the given store rows and image files into `out_dir` (default explain_adhoc); with
    neither, the stage run: explain.n_images seeded test images and the gallery into data/<name>/explain."""
    model = SalfModel.load(layout, device)
    class_map = read_class_map(open_store(layout.logits).attrs, layout.logits)
    rows, files = indices, paths
    if rows or files:
        inputs = load_inputs(model, config, layout, list(rows), list(files))
        return write_explanations(
            model, inputs, class_map, out_dir or layout.explain_adhoc, top_k=config.explain.top_k, class_index=class_index
        )
    out_dir = out_dir or layout.explain
    test_rows = splits_of(config, layout).test
    chosen = default_rows(test_rows, config.explain.n_images, config.explain.seed)
    inputs = load_inputs(model, config, layout, chosen, [])
    report = write_explanations(model, inputs, class_map, out_dir, top_k=config.explain.top_k, class_index=class_index)
    gallery = write_gallery(model, layout, test_rows, config.explain, out_dir / "gallery.png")
    return ExplainReport(out_dir, report.records, gallery)
