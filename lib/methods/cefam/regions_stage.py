"""The regions stage's work: CE-FAM explanations of every image of evaluate.split, as stores.

Writes, one row per image (manifest order), shard by shard (resumable; built in the scratch area
and published atomically):

* ``cefam/regions.zarr`` (artifacts.py): S^t, association scores and the region maps of every
  concept at every explained layer — what evaluate's `cefam` / `cefam_best4` score;
* ``cefam/concept_stats.zarr`` (lib/core/schema.py, read by `stats`): PRESENCE = S^t and
  CONTRIBUTION = CE-FAM's contribution (§3.4: the area under the relative drop of the predicted
  class's probability as the concept's top-K channels are masked at its Top-1 layer) for the
  `contribution_concepts` concepts with the highest S^t of each image, 0 for the others.
  CE-FAM does not change the model: PRED_MODEL is the backbone's prediction;

then the figures of `n_figures` seeded images (sample_figures.py) and metrics/cefam_regions.json.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress

from lib.core.distributed import Ranks, sharded_outputs
from lib.core.errors import UserError, user_error_for
from lib.core.layout import Layout
from lib.core.outputs import write_json
from lib.core.params import Params, params_hash
from lib.core.schema import (
    CONTRIBUTION,
    PRED_BACKBONE,
    PRED_MODEL,
    PRESENCE,
    STATS_IMAGE,
    STATS_LABEL,
    concept_stats_specs,
)
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.core.streams import read_rows
from lib.data.manifest import read_manifest, split_indices
from lib.methods.cefam.artifacts import (
    REGION_ASSOCIATION,
    REGION_IMAGE,
    REGION_PRESENCE,
    TrainedTranslator,
    cefam_layers,
    check_concepts,
    explained_layers,
    map_array,
)
from lib.methods.cefam.explain import BatchExplanation, ExplainSettings, FigureDetails, explain_batch, explain_details
from lib.methods.cefam.sample_figures import write_sample_figures
from lib.methods.cefam.taps import tapped_forward
from lib.models.backbones import check_backbone, load_backbone_checked
from lib.models.classes import ClassMap, read_class_map
from lib.models.layers import check_layers, split_at
from lib.pipeline.stored_concepts import read_concepts

__all__ = ["RegionsReport", "check_regions", "run_regions"]

METHOD = "cefam"
FIGURE_ONLY = {"n_figures", "figure_concepts", "figure_details", "seed"}  # regions params that change no store


@dataclass(frozen=True)
class RegionsReport:
    n_images: int
    n_concepts: int
    layers: tuple[str, ...]
    beta: str
    shards_written: int
    best_layer_share: dict[str, float]
    figures: int

    def summary(self) -> str:
        share = ", ".join(f"{layer} {value:.0%}" for layer, value in self.best_layer_share.items())
        return (
            f"{self.n_images} images x {self.n_concepts} concepts x {len(self.layers)} layers (beta: {self.beta}), "
            f"{self.shards_written} shards written; Top-1 layer share: {share}; {self.figures} figures"
        )


def check_regions(config: Params) -> None:
    """The stage's check before any work: the backbone and its weights exist and it has the
    explained layers (its architecture on the meta device)."""
    skeleton = check_backbone(config.backbone)
    if config.cefam.regions.layers is not None:
        check_layers(skeleton, config.cefam.regions.layers, "cefam.regions.layers")
    check_layers(skeleton, cefam_layers(config), "cefam.layers")


def _checked_inputs(config: Params, layout: Layout, device: torch.device):
    """The translator, concepts, explained layers and backbone, each checked against the others."""
    trained = TrainedTranslator.load(layout.cefam_translator, device)
    concepts = read_concepts(layout.concepts)
    check_concepts(trained, concepts.names)
    if concepts.attrs.get("model_id") != trained.clip_id:
        raise UserError(
            f"the concepts were embedded by {concepts.attrs.get('model_id')}, the translator mimics {trained.clip_id}",
            key="clip", fix="rerun the translator with the same CLIP (dvc repro translator)",
        )
    layers = explained_layers(trained, config.cefam.regions.layers)
    backbone = load_backbone_checked(config.backbone)
    if backbone.model_id != trained.backbone_id:
        raise UserError(
            f"the translator was trained on features of {trained.backbone_id}, params name {backbone.model_id}",
            key="backbone", fix="rerun features and translator (dvc repro translator)",
        )
    model = backbone.model.to(device).eval()
    tails = []  # the backbone from each explained layer on: contributions re-run it on masked maps
    for layer in layers:
        with user_error_for("cefam.regions.layers", layer, fix="explain layers whose output the rest of the network reads once"):
            tails.append(split_at(model, layer)[1])
    return trained, concepts, layers, backbone, model, tails


def _region_specs(n: int, m: int, layers: tuple[str, ...], shapes: list[tuple[int, int]]) -> list[ArraySpec]:
    return [
        ArraySpec(REGION_IMAGE, (n,), "int64", ("item",)),
        ArraySpec(REGION_PRESENCE, (n, m), "float32", ("item", "concept")),
        ArraySpec(REGION_ASSOCIATION, (n, m, len(layers)), "float32", ("item", "concept", "layer")),
        *(
            ArraySpec(map_array(layer), (n, m, *hw), "float16", ("item", "concept", "y", "x"))
            for layer, hw in zip(layers, shapes, strict=True)
        ),
    ]


def _blocks(
    out: BatchExplanation, images: np.ndarray, labels: np.ndarray, layers: tuple[str, ...], class_map: ClassMap
) -> tuple[dict, dict]:
    pred = class_map.predict(out.logits).cpu().numpy()  # the dataset class of the explained output
    fp16 = torch.finfo(torch.float16).max  # region values far above any seen, but an overflow would make inf
    regions = {
        REGION_IMAGE: images,
        REGION_PRESENCE: out.presence.cpu().numpy(),
        REGION_ASSOCIATION: out.association.cpu().numpy(),
        **{map_array(layer): r.clamp(max=fp16).half().cpu().numpy() for layer, r in zip(layers, out.maps, strict=True)},
    }
    stats = {
        STATS_IMAGE: images,
        STATS_LABEL: labels.astype(np.int64),
        PRED_BACKBONE: pred,
        PRED_MODEL: pred,
        PRESENCE: out.presence.cpu().numpy(),
        CONTRIBUTION: out.contribution.cpu().numpy(),
    }
    return regions, stats


def run_regions(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None = None) -> RegionsReport:
    """Explain every image of evaluate.split; write the regions and concept_stats stores, the PNGs and metrics.
    Under torchrun each rank explains and writes the shards it owns; rank 0 then writes the metrics and PNGs."""
    settings = config.cefam.regions
    trained, concepts, layers, backbone, model, tails = _checked_inputs(config, layout, device)
    class_map = read_class_map(open_store(layout.logits).attrs, layout.logits)
    if class_map is None:
        raise UserError(
            "CE-FAM explains the backbone's own predictions, and with a new head the dataset's classes are no backbone outputs",
            key="backbone.new_head", value=True, fix="map the classes onto the backbone's outputs (backbone.class_map) instead",
        )

    def target(logits: torch.Tensor) -> torch.Tensor:  # the backbone output of its prediction among the dataset's classes
        return class_map.output_of(class_map.predict(logits))

    explained = [trained.layers.index(layer) for layer in layers]
    text = concepts.text_emb.to(device)
    explain = ExplainSettings(
        beta=settings.beta, top_k=settings.top_k, score=settings.score, rule=settings.rule,
        contribution_concepts=settings.contribution_concepts, contribution_fill=settings.contribution_fill,
        negatives=settings.negatives, chunk=settings.chunk, beta_chunk=settings.beta_chunk,
    )
    rows = split_indices(read_manifest(layout.manifest), config.evaluate.split)[: config.evaluate.max_images]
    if not len(rows):
        raise UserError(f"split {config.evaluate.split!r} has no images", key="evaluate.split", value=config.evaluate.split)
    image_store = open_store(layout.images)
    images, labels = image_store["images"], image_store["labels"]
    with torch.no_grad():  # the maps' sizes
        _, probe = tapped_forward(model, backbone.preprocess(torch.from_numpy(images[rows[:1]]).to(device)), layers)
    n, m = len(rows), len(concepts.names)
    region_specs = _region_specs(n, m, layers, [tuple(a.shape[2:]) for a in probe])
    fingerprint = params_hash(
        settings.model_dump(exclude=FIGURE_ONLY), config.evaluate.split, config.evaluate.max_images, backbone.model_id,
        hashlib.sha256(layout.cefam_translator.read_bytes()).hexdigest(), concepts.attrs["fingerprint"], image_store.attrs["fingerprint"],
    )
    common = {"stage": "regions", "params_hash": fingerprint, "concepts": list(concepts.names), "split": config.evaluate.split}

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {
            "regions": ShardedWriter(
                layout.cefam_regions, region_specs, config.data.rows_per_shard,
                {**common, "layers": list(layers), "beta": settings.beta, "model_id": backbone.model_id}, fingerprint,
                create=create, scratch=layout.scratch(layout.cefam_regions),
            ),
            "stats": ShardedWriter(
                layout.concept_stats(METHOD), concept_stats_specs(n, m), config.data.rows_per_shard,
                {**common, "method": METHOD, "presence": "S^t: the scaled cosine of h(z_cat) with the concept's text embedding",
                 "contribution": f"CE-FAM's masking AUC of the predicted class's probability at the concept's Top-1 layer, for the "
                                 f"{settings.contribution_concepts} concepts of highest S^t per image (0 for the others)"},
                fingerprint, create=create, scratch=layout.scratch(layout.concept_stats(METHOD)),
            ),
        }

    with sharded_outputs(make_writers, ranks) as writers:
        first = writers["regions"]
        pending = sorted(set(first.pending(ranks.rank, ranks.world_size)) | set(writers["stats"].pending(ranks.rank, ranks.world_size)))
        task = progress.add_task("regions", total=sum(first.rows(s).stop - first.rows(s).start for s in pending)) if progress else None
        for shard in pending:
            block = rows[first.rows(shard)]
            parts: list[tuple[dict, dict]] = []
            for start in range(0, len(block), settings.batch_size):
                batch = block[start : start + settings.batch_size]
                x = backbone.preprocess(torch.from_numpy(read_rows(images, batch)).to(device))
                out = explain_batch(model, x, trained.model, text, trained.layers, explained, tails, explain, target)
                parts.append(_blocks(out, batch, read_rows(labels, batch), layers, class_map))
                if task is not None:
                    progress.advance(task, len(batch))
            for key, index in (("regions", 0), ("stats", 1)):
                blocks = {name: np.concatenate([p[index][name] for p in parts]) for name in writers[key].specs}
                writers[key].write(shard, blocks)
    if not ranks.is_main:  # rank 0 reads the finished stores for the metrics and figures
        return RegionsReport(n, m, layers, settings.beta, len(pending), {}, 0)

    best = open_store(layout.cefam_regions)[REGION_ASSOCIATION][:].argmax(axis=2)
    share = {layer: float((best == i).mean()) for i, layer in enumerate(layers)}
    stats = open_store(layout.concept_stats(METHOD))
    computed = stats[CONTRIBUTION][:]
    computed = computed[computed != 0]
    write_json(layout.cefam_metrics("regions"), {
        "n_images": n,
        "acc_backbone": float((stats[PRED_BACKBONE][:] == stats[STATS_LABEL][:]).mean()),
        "top1_layer_share": share,  # share of (image, concept) pairs whose Top-1 layer is each layer
        "contribution_mean": float(computed.mean()) if computed.size else None,  # over the nonzero contributions
        # negatives "keep": share of the nonzero contributions below 0; "drop": 0 (they are stored as 0)
        "contribution_negative_share": float((computed < 0).mean()) if computed.size else None,
        # nonzero contributions / the contributions computed (contribution_concepts per image): under "drop", the
        # share of the explained concepts the authors' positive_only keeps
        "contribution_kept_share": computed.size / (n * min(settings.contribution_concepts, m)),
    }, digits=6)

    def details(image: np.ndarray, order: np.ndarray, best: np.ndarray) -> FigureDetails:
        x = backbone.preprocess(torch.from_numpy(image[None]).to(device))
        return explain_details(
            model, x, trained.model, text, trained.layers, explained, tails, explain,
            torch.from_numpy(order).to(device), torch.from_numpy(best).to(device), target,
        )

    figures = write_sample_figures(layout, config, rows, concepts.names, layers, details)
    return RegionsReport(n, m, layers, settings.beta, len(pending), share, figures)
