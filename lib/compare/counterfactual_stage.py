"""The counterfactuals stage: every present concept's true effect on each explained model's decision.

For each image of `evaluate.split` (toy world only) and each concept it shows, every single-concept
edit (lib/toy/counterfactual.py: the concept replaced by each other value of its type) is rendered
and scored by each explained model (lib.compare.explained_models.py). The true effect of concept k
on model m is Δ[n, k, m] = y(x) − mean over the edits of k of y(x′), y the logit of the class model
m predicts for the original image. Δ is NaN for concepts the image does not show. The store keeps
every edit's logit and tag (rule-breaking, rule-creating, neutral) beside Δ.

Cost: one forward of the backbone per counterfactual (~23 per image), the concept models' heads on
the captured layers. Sharded and resumable like `features`: a shard is `data.rows_per_shard` images.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from lib.compare.explained_models import ExplainedModels, load_explained_models
from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import Params, params_hash, source_hash
from lib.core.skipped import SKIPPED_FILE, no_renderer, write_skipped_folder
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.core.streams import read_rows
from lib.data.manifest import read_manifest
from lib.data.prepare import toy_split_draw
from lib.metrics.causal import true_effects
from lib.toy import counterfactual, world

__all__ = ["CounterfactualsReport", "run_counterfactuals"]

# Most edits one image can have: the other backgrounds, then per object the other colours, shapes, patterns.
_TYPE_SIZES = {kind: sum(c.type == kind for c in world.CONCEPTS) for kind in world.CONCEPT_TYPES}
MAX_EDITS = _TYPE_SIZES["background"] - 1 + world.MAX_OBJECTS * sum(_TYPE_SIZES[t] - 1 for t in ("color", "shape", "pattern"))


@dataclass(frozen=True)
class CounterfactualsReport:
    n_images: int
    n_edits: int
    models: tuple[str, ...]
    mean_abs_effect: dict[str, float]
    path: Path
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped} ({self.path / SKIPPED_FILE})"
        effects = ", ".join(f"{m} {v:.3f}" for m, v in self.mean_abs_effect.items())
        return (
            f"{self.n_images} images, {self.n_edits} counterfactuals ({self.n_edits / self.n_images:.1f} per image) "
            f"on {', '.join(self.models)}; mean |true effect| of a present concept: {effects} -> {self.path}"
        )


def _split_scenes(config: Params, layout: Layout) -> tuple[np.ndarray, counterfactual.Scenes]:
    """The image-store rows of evaluate.split and their replayed scenes, checked to re-render the stored
    images byte for byte (a store of other params fails here, not with wrong effects)."""
    split = config.evaluate.split
    manifest = read_manifest(layout.manifest)
    rows = manifest.loc[manifest["split"] == split, "index"].to_numpy(np.int64)
    n, seed = toy_split_draw(config.data, split)
    scenes = counterfactual.replay(n, seed, config.data.image_size, config.data.toy.max_objects)
    images = open_store(layout.images)["images"]
    stale = len(rows) != n
    for chunk in range(len(scenes.chunk_states)):
        if stale:
            break
        span = scenes.chunk_rows(chunk)
        stale = counterfactual.render_chunk(scenes, chunk)[0].tobytes() != read_rows(images, rows[span]).tobytes()
    if stale:
        raise UserError(
            f"{layout.images} does not hold the toy world that data params describe (split {split!r})",
            key="data", fix="rerun the prepare stage (dvc repro prepare)",
        )
    return rows, scenes


def _specs(n: int, models: int) -> list[ArraySpec]:
    k = len(world.CONCEPTS)
    return [
        ArraySpec("image", (n,), "int64", ("item",)),
        ArraySpec("label", (n,), "int64", ("item",)),
        ArraySpec("prediction", (n, models), "int64", ("item", "model")),
        ArraySpec("logit", (n, models), "float32", ("item", "model")),
        ArraySpec("edit_concept", (n, MAX_EDITS), "int16", ("item", "edit")),
        ArraySpec("edit_replacement", (n, MAX_EDITS), "int16", ("item", "edit")),
        ArraySpec("edit_tag", (n, MAX_EDITS), "int8", ("item", "edit")),
        ArraySpec("edit_logit", (n, MAX_EDITS, models), "float32", ("item", "edit", "model")),
        ArraySpec("effect", (n, k, models), "float32", ("item", "concept", "model")),
    ]


def effects_block(
    models: ExplainedModels, scenes: counterfactual.Scenes, images: np.ndarray, first: int, edits: pd.DataFrame, device: torch.device
) -> dict[str, np.ndarray]:
    """The store's arrays for the scenes first .. first + len(images) - 1 (uint8 images (B, S, S, 3)
    as stored) and their edits (rows of counterfactual.concept_edits)."""
    b, n_models, k = len(images), len(models.names), len(world.CONCEPTS)
    original = models.scores(torch.from_numpy(images).to(device)).cpu()  # (B, models, classes)
    prediction = original.argmax(dim=2)  # (B, models)
    logit = original.gather(2, prediction[..., None])[..., 0].numpy()
    edit_logit = np.full((b, MAX_EDITS, n_models), np.nan, np.float32)
    local, slot = edits["image"].to_numpy() - first, edits["round"].to_numpy()
    for positions, edited, _ in counterfactual.render_edits(scenes, edits):
        scores = models.scores(torch.from_numpy(edited).to(device)).cpu()  # (E, models, classes)
        of = prediction[local[positions]]  # (E, models): each original prediction
        edit_logit[local[positions], slot[positions]] = scores.gather(2, of[..., None])[..., 0].numpy()

    def padded(column: str, dtype: str) -> np.ndarray:
        out = np.full((b, MAX_EDITS), -1, dtype)
        out[local, slot] = edits[column].to_numpy()
        return out

    concept = padded("concept", "int16")
    effect = true_effects(logit, concept, edit_logit, k)
    return {
        "prediction": prediction.numpy().astype(np.int64),
        "logit": logit.astype(np.float32),
        "edit_concept": concept,
        "edit_replacement": padded("replacement", "int16"),
        "edit_tag": padded("tag", "int8"),
        "edit_logit": edit_logit,
        "effect": effect,
    }


def run_counterfactuals(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> CounterfactualsReport:
    """Write data/<name>/counterfactuals.zarr for the first compare.max_images images of evaluate.split
    (on data without a renderer, a folder holding only SKIPPED with the reason)."""
    reason = no_renderer(config.data.kind)
    if reason:
        write_skipped_folder(layout.counterfactuals, reason)
        return CounterfactualsReport(0, 0, (), {}, layout.counterfactuals, reason)
    rows, scenes = _split_scenes(config, layout)
    rows = rows[: config.compare.max_images]
    models = load_explained_models(config, layout, device)
    edits = counterfactual.concept_edits(scenes)
    edits = edits[edits["image"] < len(rows)]
    model_files = [p for p in (layout.salf_bottleneck, layout.salf_classifier, layout.fact_sae) if p.exists()]
    fingerprint = params_hash(
        config.data, config.backbone, config.evaluate.split, len(rows), models.backbone.model_id, list(models.names),
        *(hashlib.sha256(p.read_bytes()).hexdigest() for p in model_files),
        open_store(layout.images).attrs["fingerprint"],
        source_hash(sys.modules[__name__]), source_hash(counterfactual), source_hash(sys.modules[ExplainedModels.__module__]),
    )
    attributes = {
        "stage": "counterfactuals", "split": config.evaluate.split, "models": list(models.names),
        "concepts": [c.name for c in world.CONCEPTS], "tags": [t.name.lower() for t in counterfactual.EditTag],
    }
    path = layout.counterfactuals
    writer = ShardedWriter(path, _specs(len(rows), len(models.names)), config.data.rows_per_shard, attributes, fingerprint)
    image_store = open_store(layout.images)["images"]
    pending = writer.pending()
    task = progress.add_task("counterfactuals", total=len(pending)) if progress is not None else None
    for shard in pending:
        span = writer.rows(shard)
        mine = edits[(edits["image"] >= span.start) & (edits["image"] < span.stop)]
        block = effects_block(models, scenes, read_rows(image_store, rows[span]), span.start, mine, device)
        writer.write(shard, {**block, "image": rows[span], "label": scenes.labels[span]})
        if task is not None:
            progress.advance(task)
    writer.finalize()
    effect = open_store(path)["effect"][:]
    mean_abs = {m: float(np.nanmean(np.abs(effect[..., i]))) for i, m in enumerate(models.names)}
    return CounterfactualsReport(len(rows), len(edits), models.names, mean_abs, path)
