"""The translator stage's work: pool the features of cefam.layers, train h to the CLIP image
embeddings, choose by val, report on test.

z^l is the global average pool of layer l's stored feature maps; z_cat concatenates them in the
order of cefam.layers (paper eq. 4-5). The pooled vectors go to a sharded store once
(``cefam/pooled.zarr``, N x sum C fp16), so every epoch reads N vectors instead of N feature maps.
Targets are the clip_images store's embeddings: raw (the unit embedding times its stored norm, as
the authors regress `get_image_features`; `cefam.translator.targets: raw`) or L2-normalised
(`normalized`; translator.py says what that changes). With `cefam.translator.augment` the training
split is recomputed every epoch on random crops instead (translator_augment.py: the backbone and
the CLIP rerun on each crop); val and test always use the stored features of the stored images.
Concept scores use the CLIP's own logit scale (and bias, for SigLIP-style models), read from the
CLIP named in params, which must be the one that made the embeddings.

Under `torchrun --nproc-per-node K` rank 0 pools the features, then every rank trains with DDP
(training.py) on the whole shards it owns of each split, in batches of batch_size // K (the global
batch stays cefam.translator.batch_size), and rank 0 writes the outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import zarr
from rich.progress import Progress

from lib.core.distributed import Ranks, barrier, rank_rows
from lib.core.errors import UserError, user_error_for
from lib.core.layout import Layout
from lib.core.outputs import write_csv, write_json
from lib.core.params import Params, params_hash
from lib.core.progress import progress_callback
from lib.core.schema import CLIP_MODEL_KEY, FEATURES, IMAGE_EMB, IMAGE_NORM, check_compatible, check_same_images
from lib.core.stores import ArraySpec, ShardedWriter, open_store, remove_empty_scratch_dirs
from lib.data.manifest import read_manifest, split_indices, train_val_indices
from lib.methods.cefam.artifacts import cefam_layers, save_translator
from lib.methods.cefam.training import EpochSource, TrainSettings, evaluate_translator, split_source, train_translator
from lib.methods.cefam.translator import Translator
from lib.methods.cefam.translator_augment import augmented_source, crop_encoder
from lib.models.backbones import check_backbone, load_backbone_checked
from lib.models.clip import LoadedClip, load_clip_checked
from lib.models.layers import check_layers
from lib.pipeline.stored_concepts import read_concepts

__all__ = ["POOLED", "TranslatorReport", "check_translator", "run_translator", "write_pooled"]

POOLED = "z_cat"  # the pooled store's array (N, sum C)


def check_translator(config: Params) -> None:
    """The stage's check before any work: the backbone has every layer of cefam.layers (its
    architecture on the meta device; no weights read)."""
    check_layers(check_backbone(config.backbone, weights=False), cefam_layers(config), "cefam.layers")


def write_pooled(layout: Layout, layers: tuple[str, ...], progress: Progress | None = None) -> tuple[zarr.Array, list[int], str]:
    """Write (or keep, if up to date) the pooled store; return its array, the layers' channel
    counts and the model id of the backbone that made the features."""
    stores = []
    for layer in layers:
        with user_error_for("cefam.layers", list(layers), fix="run the features stage with the layer in features.layers"):
            stores.append(open_store(layout.features(layer)))
    arrays = [store[FEATURES] for store in stores]
    for layer, array in zip(layers, arrays, strict=True):
        if array.ndim != 4:
            raise UserError(
                f"the {layer} store holds {array.ndim}-D features; CE-FAM needs (N, C, H, W) maps", key="cefam.layers", value=layer
            )
    models = {store.attrs.get("model_id") for store in stores}  # every store records its model as model_id
    if len(models) != 1:
        raise UserError(
            f"the feature stores of {list(layers)} come from different backbones {sorted(map(str, models))}", fix="rerun the features stage"
        )
    check_same_images(layout.images, {f"features/{layer}": store.attrs for layer, store in zip(layers, stores, strict=True)})
    channels = [array.shape[1] for array in arrays]
    n, rows = arrays[0].shape[0], (arrays[0].shards or arrays[0].chunks)[0]
    fingerprint = params_hash(list(layers), [store.attrs["fingerprint"] for store in stores])
    spec = ArraySpec(POOLED, (n, sum(channels)), "float16", ("item", "channel"))
    attributes = {"stage": "translator", "params_hash": fingerprint, "layers": list(layers), "channels": channels}
    writer = ShardedWriter(layout.cefam_pooled, [spec], rows, attributes, fingerprint, scratch=layout.scratch(layout.cefam_pooled))
    pending = writer.pending()
    task = progress.add_task("pool features", total=len(pending)) if progress is not None and pending else None
    step = (arrays[0].chunks or (rows,))[0]  # one inner chunk of maps at a time bounds memory at any layer size
    for shard in pending:
        block = writer.rows(shard)
        parts = []
        for start in range(block.start, block.stop, step):
            rows_i = slice(start, min(start + step, block.stop))
            parts.append(np.concatenate([a[rows_i].astype(np.float32).mean(axis=(2, 3)) for a in arrays], axis=1))
        writer.write(shard, {POOLED: np.concatenate(parts)})
        if task is not None:
            progress.advance(task)
    writer.finalize()
    return open_store(layout.cefam_pooled)[POOLED], channels, str(stores[0].attrs["model_id"])


@dataclass(frozen=True)
class TranslatorReport:
    layers: tuple[str, ...]
    widths: tuple[int, ...]  # in_dim, hidden..., out_dim
    n_train: int
    n_val: int
    val_from_train: bool
    best_epoch: int
    epochs: int
    stopped_early: bool
    resumed_from: int
    metrics: dict[str, float]

    def summary(self) -> str:
        widths = " -> ".join(map(str, self.widths))
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        stop = " (early stop)" if self.stopped_early else ""
        val = "val carved from train" if self.val_from_train else "manifest val split"
        m = self.metrics
        return (
            f"h {widths} on {', '.join(self.layers)}; best val loss {m['val_loss']:.4g} at epoch {self.best_epoch} of "
            f"{self.epochs}{stop}{resumed}; test cos {m['translator_cos']:.3f}, top-1 concept agreement "
            f"{m['concept_agreement']:.3f} (score correlation {m['concept_corr']:.3f}); "
            f"{self.n_train} train / {self.n_val} val images ({val})"
        )


def _load_clip(config: Params, made_by: str) -> LoadedClip:
    """The CLIP of params, which must be the one that made the embeddings."""
    clip = load_clip_checked(config.clip)
    if clip.model_id != made_by:
        raise UserError(
            f"clip_images.zarr was made by {made_by}, params name {clip.model_id}", key="clip",
            fix="rerun clip_images and concepts (dvc repro)",
        )
    return clip


def _clip_scale(clip: LoadedClip) -> tuple[float, float]:
    """The CLIP's logit scale exp(t) and bias (0 without one)."""
    bias = getattr(clip.model, "logit_bias", None)
    return float(clip.model.logit_scale.exp()), float(bias) if bias is not None else 0.0


def _target_norms(config: Params, clip_store: zarr.Group) -> zarr.Array | None:
    """The raw embeddings' norms for `targets: raw` (None for normalized); stores written before
    clip_images kept them are refused."""
    if config.cefam.translator.targets == "normalized":
        return None
    if IMAGE_NORM not in clip_store:
        raise UserError(
            "clip_images.zarr holds no raw embedding norms (written by an older clip_images)",
            key="cefam.translator.targets", value="raw", fix="rerun clip_images (dvc repro clip_images), or use targets: normalized",
        )
    return clip_store[IMAGE_NORM]


def _augmented_train(
    config: Params, layout: Layout, clip: LoadedClip, backbone_id: str, rows: np.ndarray, batch: int, device: torch.device, seed: int
) -> EpochSource:
    """The training source of `augment`: fresh crops every epoch through the frozen backbone (the
    one that made the stored features) and the frozen CLIP."""
    settings = config.cefam.translator
    backbone = load_backbone_checked(config.backbone)
    if backbone.model_id != backbone_id:
        raise UserError(
            f"the stored features were made by {backbone_id}, params name {backbone.model_id}", key="backbone",
            fix="rerun the features stage (dvc repro features)",
        )
    backbone.model.to(device).eval()
    clip.model.to(device).eval()
    encode = crop_encoder(backbone, cefam_layers(config), clip, raw=settings.targets == "raw")
    return augmented_source(
        open_store(layout.images)["images"], rows, batch, encode, scale=settings.crop_scale, seed=seed, device=device,
        in_memory_mb=settings.in_memory_mb,
    )


def run_translator(
    config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None = None
) -> TranslatorReport:
    """Train the translator on train, choose by val; write translator.pt, metrics/cefam.json and the loss curve."""
    settings = config.cefam.translator
    layers = cefam_layers(config)
    clip_store = open_store(layout.clip_images)
    concepts = read_concepts(layout.concepts)
    check_compatible(clip_store.attrs, concepts.attrs, ("clip_images", "concepts"))
    check_same_images(layout.images, {"clip_images": clip_store.attrs})
    clip = _load_clip(config, clip_store.attrs[CLIP_MODEL_KEY])
    scale, bias = _clip_scale(clip)
    norm = _target_norms(config, clip_store)
    if not ranks.is_main:
        barrier(ranks)  # rank 0 writes the pooled store first
    pooled, channels, backbone_id = write_pooled(layout, layers, progress)
    if ranks.is_main:
        barrier(ranks)
    emb = clip_store[IMAGE_EMB]
    manifest = read_manifest(layout.manifest)
    with user_error_for("cefam.translator.val_fraction", settings.val_fraction):
        train_rows, val_rows, carved = train_val_indices(manifest, settings.val_fraction, settings.seed)
    test_rows = split_indices(manifest, "test")

    torch.manual_seed(settings.seed)
    model = Translator(sum(channels), emb.shape[1], settings.hidden, scale, bias).to(device)
    text = concepts.text_emb.to(device)
    stream = {"device": device, "in_memory_mb": settings.in_memory_mb, "norm": norm}
    rows_per_shard, batch = (pooled.shards or pooled.chunks)[0], max(1, settings.batch_size // ranks.world_size)
    mine = {name: rank_rows(rows, rows_per_shard, ranks) for name, rows in (("train", train_rows), ("val", val_rows), ("test", test_rows))}
    if settings.augment:
        train = _augmented_train(config, layout, clip, backbone_id, mine["train"], batch, device, settings.seed + ranks.rank)
    else:
        train = split_source(pooled, emb, mine["train"], batch, shuffle=True, seed=settings.seed + ranks.rank, **stream)
    val = split_source(pooled, emb, mine["val"], batch, **stream)
    fingerprint = params_hash(
        settings, list(layers), scale, bias, open_store(layout.cefam_pooled).attrs["fingerprint"],
        clip_store.attrs["fingerprint"], concepts.attrs["fingerprint"],
    )
    checkpoint = layout.scratch(layout.cefam_translator).with_name("translator_state.pt")
    train_settings = TrainSettings(
        lam=settings.lam, optimizer=settings.optimizer, lr=settings.lr, momentum=settings.momentum,
        weight_decay=settings.weight_decay, max_epochs=settings.max_epochs, plateau_patience=settings.plateau_patience,
        plateau_factor=settings.plateau_factor, patience=settings.patience,
    )
    model, history = train_translator(
        model, train, val, text if settings.lam > 0 else None, train_settings, checkpoint=checkpoint,
        fingerprint=fingerprint, progress=progress_callback(progress, "translator", settings.max_epochs, "val_loss"), ranks=ranks,
    )

    val_scores = evaluate_translator(model, val, text, settings.lam, ranks)
    if len(test_rows):
        test = split_source(pooled, emb, mine["test"], batch, **stream)
        test_scores = evaluate_translator(model, test, text, settings.lam, ranks)
    else:
        test_scores = dict.fromkeys(val_scores, math.nan)
    metrics = {
        "translator_cos": test_scores["cos"],  # mean cosine of h(z_cat) and the CLIP image embedding, test split
        "concept_agreement": test_scores["agreement"],  # top-1 concept of h equals CLIP's, test split
        "concept_corr": test_scores["corr"],  # Pearson r of h's and CLIP's concept scores per image, test mean
        "test_loss": test_scores["loss"],
        "val_cos": val_scores["cos"],
        "val_concept_agreement": val_scores["agreement"],
        "val_loss": history["best_val_loss"],
        "best_epoch": history["best_epoch"],
        "epochs": len(history["epoch"]),
        "lam": settings.lam,
        "n_concepts": len(concepts.names),
    }
    report = TranslatorReport(
        layers, (model.in_dim, *model.hidden, model.out_dim), len(train_rows), len(val_rows), carved,
        history["best_epoch"], len(history["epoch"]), history["stopped_early"], history["resumed_from"], metrics,
    )
    if not ranks.is_main:  # every rank holds the same model; one writes it
        return report
    provenance = {"stage": "translator", "params_hash": fingerprint}
    save_translator(
        layout.cefam_translator, model, layers, channels, concepts.names, settings.lam, backbone_id,
        clip_store.attrs[CLIP_MODEL_KEY], {"history": {k: history[k] for k in ("epoch", "train_loss", "val_loss", "lr")},
                                           "best_epoch": history["best_epoch"], "provenance": provenance},
    )
    write_json(layout.cefam_metrics("translator"), metrics, digits=6)
    curve = pd.DataFrame({k: history[k] for k in ("epoch", "train_loss", "val_loss", "lr")})
    write_csv(layout.cefam_plot("translator"), curve)
    checkpoint.unlink(missing_ok=True)  # published: a rerun must train afresh, not resume a finished run
    remove_empty_scratch_dirs(checkpoint.parent)
    return report
