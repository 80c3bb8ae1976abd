"""CE-FAM outputs on disk: the translator checkpoint and the regions store, with their checks.

The checkpoint is a torch pickle of a plain dict (tensors, strings, numbers) read back with
``weights_only=True``. It records what the translator was trained on — the backbone layers (in
z_cat order) with their channel counts, the backbone and CLIP that made its inputs, and the
concept list — so `regions` can refuse inputs that no longer match instead of explaining with a
stale model.

The regions store (``data/<name>/cefam/regions.zarr``, one row per image of evaluate.split, in
manifest order) holds per image: REGION_IMAGE (its images.zarr row), REGION_PRESENCE S^t (M,),
REGION_ASSOCIATION (M, L) and one map array per explained layer, ``map_<layer>`` (M, h_l, w_l) fp16
(R^l_t = ReLU(sum_k beta^t_k A^l_k), unnormalised). Its size is n * M * sum_l h_l w_l fp16 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from lib.core.errors import UserError
from lib.core.outputs import write_atomic
from lib.core.params import Params
from lib.core.stores import open_store
from lib.methods.cefam.translator import Translator

__all__ = [
    "REGION_ASSOCIATION",
    "REGION_IMAGE",
    "REGION_PRESENCE",
    "RegionsStore",
    "TrainedTranslator",
    "cefam_layers",
    "check_concepts",
    "explained_layers",
    "map_array",
    "save_translator",
]

REGION_IMAGE = "image"  # (n,) int64: the row in images.zarr
REGION_PRESENCE = "presence"  # (n, M) float32: S^t
REGION_ASSOCIATION = "association"  # (n, M, L) float32: association score of each explained layer


def cefam_layers(config: Params) -> tuple[str, ...]:
    """The layers of z_cat: cefam.layers, default every layer of features.layers."""
    return config.cefam.layers or config.features.layers


def map_array(layer: str) -> str:
    """Name of the regions store's map array of `layer`: (n, M, h, w) fp16."""
    return f"map_{layer}"


@dataclass(frozen=True)
class TrainedTranslator:
    """A trained translator and what it was trained on."""

    model: Translator  # eval mode
    layers: tuple[str, ...]  # backbone layers in z_cat order
    channels: tuple[int, ...]  # their channel counts
    concepts: tuple[str, ...]  # the concept list of the similarity loss (names, in order)
    lam: float  # similarity-loss weight; 0 = concept-free (any concept list may be explained)
    backbone_id: str  # model_id of the backbone whose features it read
    clip_id: str  # model_id of the CLIP whose embeddings it mimics
    state: dict[str, Any]  # the whole saved dict (history, best epoch, provenance)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> TrainedTranslator:
        if not path.exists():
            raise UserError(f"{path}: no CE-FAM translator", fix="run the translator stage first (dvc repro translator)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = Translator(state["in_dim"], state["out_dim"], state["hidden"], state["scale"], state["bias"])
        model.load_state_dict(state["weights"])
        return cls(
            model.to(device).eval(),
            tuple(state["layers"]),
            tuple(state["channels"]),
            tuple(state["concepts"]),
            float(state["lam"]),
            state["backbone_id"],
            state["clip_id"],
            state,
        )


def save_translator(
    path: Path,
    model: Translator,
    layers: Sequence[str],
    channels: Sequence[int],
    concepts: Sequence[str],
    lam: float,
    backbone_id: str,
    clip_id: str,
    extra: dict[str, Any],
) -> None:
    """Write the checkpoint (atomically): weights, architecture, and what it was trained on."""
    if sum(channels) != model.in_dim or len(channels) != len(layers):
        raise ValueError(f"layers {list(layers)} with channels {list(channels)} do not make the translator's input ({model.in_dim})")
    state = {
        "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "in_dim": model.in_dim,
        "out_dim": model.out_dim,
        "hidden": list(model.hidden),
        "scale": float(model.scale),
        "bias": float(model.bias),
        "layers": list(layers),
        "channels": [int(c) for c in channels],
        "concepts": list(concepts),
        "lam": float(lam),
        "backbone_id": backbone_id,
        "clip_id": clip_id,
        **extra,
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def explained_layers(trained: TrainedTranslator, wanted: Sequence[str] | None) -> tuple[str, ...]:
    """The layers to explain: `wanted` (cefam.regions.layers) or, if None, all the translator's;
    UserError if it asks for a layer the translator was not trained on."""
    if wanted is None:
        return trained.layers
    missing = [layer for layer in wanted if layer not in trained.layers]
    if missing:
        raise UserError(
            f"the translator was trained on layers {list(trained.layers)}, not on {missing}",
            key="cefam.regions.layers", value=list(wanted),
            fix="pick layers from those, or add them to cefam.layers and retrain (dvc repro translator)",
        )
    return tuple(wanted)


def check_concepts(trained: TrainedTranslator, names: Sequence[str]) -> None:
    """UserError if the concept list changed since a concept-aware translator (lam > 0) was trained.

    A concept-free translator (lam = 0, paper §4.6) never saw the list: any list may be explained.
    """
    if trained.lam == 0 or tuple(names) == trained.concepts:
        return
    added = [n for n in names if n not in trained.concepts]
    removed = [n for n in trained.concepts if n not in names]
    change = ", ".join(f"{what} {names}" for what, names in (("added", added), ("removed", removed)) if names)
    raise UserError(
        f"the concept list changed since the translator was trained with the concept loss ({change or 'same concepts in another order'})",
        key="concepts.file",
        fix="retrain it (dvc repro translator), or set cefam.translator.lam: 0 for a concept-free translator",
    )


@dataclass(frozen=True)
class RegionsStore:
    """The regions stage's store, opened for reading (evaluate's cefam adapters, figures)."""

    group: zarr.Group
    layers: tuple[str, ...]
    concepts: tuple[str, ...]
    position: np.ndarray  # (N images,) int64: row of each images.zarr row in this store, -1 if absent

    @classmethod
    def open(cls, path: Path, n_images: int) -> RegionsStore:
        group = open_store(path)
        image = group[REGION_IMAGE][:]
        position = np.full(n_images, -1, dtype=np.int64)
        position[image] = np.arange(len(image))
        return cls(group, tuple(group.attrs["layers"]), tuple(group.attrs["concepts"]), position)

    def rows(self, images: np.ndarray) -> np.ndarray:
        """Store rows of images.zarr rows; UserError if the store lacks one (another split)."""
        rows = self.position[images]
        if (rows < 0).any():
            missing = images[rows < 0]
            raise UserError(
                f"the CE-FAM regions store has no row for images {missing[:5].tolist()}… (it was made for another split)",
                fix="rerun the regions stage (dvc repro regions)",
            )
        return rows
