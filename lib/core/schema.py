"""Names shared by the stores' writers and readers: array names and provenance keys.

One place, so a stage never borrows a constant from another stage's module.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib.core.errors import UserError
from lib.core.stores import ArraySpec, open_store

# features.zarr/<layer>.zarr hold FEATURES; features/logits.zarr holds LOGITS
FEATURES = "features"
LOGITS = "logits"
# clip_images.zarr: plain-image CLIP embeddings (N, D) L2-normalised, the raw embeddings' norms (N,),
# and optionally dense tokens (N, D', h, w)
IMAGE_EMB = "image_emb"
IMAGE_NORM = "image_norm"
DENSE = "dense"
# circles.zarr: red-circle embeddings (N, G, G, D)
CIRCLES = "circles"
# concepts store: text embeddings (M, D)
TEXT_EMB = "text_emb"
# similarity.zarr: P (N, M, G, G)
P = "P"

# Attribute keys every CLIP-made store records (model_id is every store's provenance key for its
# model; for these stores that model is the CLIP).
CLIP_MODEL_KEY = "model_id"
EMBED_DIM_KEY = "embed_dim"


def clip_provenance(model_id: str, embed_dim: int) -> dict[str, Any]:
    """The attributes `check_compatible` compares, for a store made with this CLIP."""
    return {CLIP_MODEL_KEY: model_id, EMBED_DIM_KEY: embed_dim}


def check_compatible(a_attrs: Mapping[str, Any], b_attrs: Mapping[str, Any], names: tuple[str, str] = ("circles", "concepts")) -> None:
    """Raise a UserError unless both stores were made by the same CLIP (model id and embedding dim)."""
    for key in (CLIP_MODEL_KEY, EMBED_DIM_KEY):
        for name, attrs in zip(names, (a_attrs, b_attrs)):
            if key not in attrs:
                raise UserError(f"{name} store attributes lack {key!r}; have {sorted(attrs)}", fix=f"re-run the {name} stage")
        if a_attrs[key] != b_attrs[key]:
            raise UserError(
                f"{names[0]} and {names[1]} come from different CLIPs: {key} = {a_attrs[key]!r} ({names[0]}) vs "
                f"{b_attrs[key]!r} ({names[1]})",
                key="clip", fix="re-run both with the same clip params (dvc repro)",
            )


# Attribute keys of stores computed from the images through a model's preprocessing (features,
# circles): how the model saw the stored images, so lib.kernels.registration can map between views.
PREPROCESS_KEY = "preprocess"  # lib.kernels.preprocess.Preprocess.to_dict()
IMAGE_SIZE_KEY = "image_size"  # [H, W] of the stored images
# Every store computed row by row from the images (features, clip_images, circles, similarity)
# records the image store's fingerprint, so a stage pairing rows of two of them can check that
# both come from the current images (a stage run by hand after the images changed would not).
IMAGES_KEY = "images_fingerprint"


def view_provenance(preprocess: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
    """The attributes that record a model's view of the stored images."""
    return {PREPROCESS_KEY: dict(preprocess), IMAGE_SIZE_KEY: [int(v) for v in image_size]}


def images_provenance(image_store_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attribute that records which image store a store was computed from."""
    return {IMAGES_KEY: image_store_attrs["fingerprint"]}


def check_same_images(images: Path, stores: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise a UserError unless every named store (name -> its attributes) was computed from the
    image store at `images` (the current images)."""
    seen = {"images": open_store(images).attrs["fingerprint"]} | {name: attrs.get(IMAGES_KEY) for name, attrs in stores.items()}
    missing = [name for name, fingerprint in seen.items() if fingerprint is None]
    if missing:
        raise UserError(f"the {', '.join(missing)} store(s) do not record the images they were made from",
                        fix=f"re-run {', '.join(missing)} (dvc repro)")  # fmt: skip
    if len(set(seen.values())) > 1:
        raise UserError(
            f"the {', '.join(seen)} stores were made from different images (image store fingerprints "
            + ", ".join(f"{name} {str(fp)[:12]}" for name, fp in seen.items()) + ")",
            fix="re-run the stages after prepare on the current images (dvc repro)",
        )


# Per-image concept statistics every concept method writes for the `stats` stage
# (Layout.concept_stats(method) -> data/<name>/<method>/concept_stats.zarr), one row per image of the
# evaluated split, in manifest order; attributes: "method", "concepts" (names, in column order),
# "split". Contributions are to the logit of the class the method explains (its prediction,
# PRED_MODEL), bias excluded, so per image they sum to that logit minus the bias for exact methods.
STATS_IMAGE = "image"  # (n,) int64: the row in images.zarr
STATS_LABEL = "label"  # (n,) int64: the true class
PRED_BACKBONE = "pred_backbone"  # (n,) int64: the backbone's own prediction (dataset class; -1 with backbone.new_head)
PRED_MODEL = "pred_model"  # (n,) int64: the prediction with the concept model in place
PRESENCE = "presence"  # (n, J) float32: how present each concept is (method-specific, >= 0 where defined)
CONTRIBUTION = "contribution"  # (n, J) float32: each concept's contribution to the PRED_MODEL logit


def concept_stats_specs(n_images: int, n_concepts: int) -> list[ArraySpec]:
    """The arrays of a concept_stats store (above), for lib.core.stores.ShardedWriter."""
    per_image = [ArraySpec(name, (n_images,), "int64", ("item",)) for name in (STATS_IMAGE, STATS_LABEL, PRED_BACKBONE, PRED_MODEL)]
    per_concept = [ArraySpec(name, (n_images, n_concepts), "float32", ("item", "concept")) for name in (PRESENCE, CONTRIBUTION)]
    return per_image + per_concept
