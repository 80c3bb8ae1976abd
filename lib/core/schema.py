"""Names shared by the stores' writers and readers: array names and provenance keys.

One place, so a stage never borrows a constant from another stage's module.
"""

from collections.abc import Mapping
from typing import Any

from lib.core.errors import UserError

# features.zarr/<layer>.zarr hold FEATURES; features/logits.zarr holds LOGITS
FEATURES = "features"
LOGITS = "logits"
# clip_images.zarr: plain-image CLIP embeddings (N, D), and optionally dense tokens (N, D', h, w)
IMAGE_EMB = "image_emb"
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
