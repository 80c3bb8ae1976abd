"""Images to explain and their concept maps: store rows (features already extracted) or image
files (run through the backbone), plus ROI arguments of the interactive commands."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lib.core.errors import UserError, user_error_for
from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.stores import open_store
from lib.data.imagefolder import BadImageError, load_rgb
from lib.methods.salf.artifacts import SalfModel
from lib.methods.salf.explain import Roi

__all__ = ["Inputs", "file_maps", "load_inputs", "parse_roi", "row_images", "row_maps"]


def _read(array, rows: Sequence[int]) -> np.ndarray:
    """array[rows] for any order and repeats: one sorted read, then the requested order."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0:
        raise UserError(f"rows must be a non-empty list of store rows, got {rows.tolist()}")
    if int(rows.min()) < 0 or int(rows.max()) >= array.shape[0]:
        raise UserError(f"store rows {rows.tolist()} out of range; the store has rows 0..{array.shape[0] - 1}")
    unique, inverse = np.unique(rows, return_inverse=True)
    return array.get_orthogonal_selection((unique,))[inverse]


def row_images(layout: Layout, rows: Sequence[int]) -> np.ndarray:
    """uint8 (B, H, W, 3) images of store rows."""
    return _read(open_store(layout.images)["images"], rows)


def row_maps(model: SalfModel, layout: Layout, rows: Sequence[int]) -> Tensor:
    """Concept maps (B, M, G, G) of store rows, from their stored features."""
    features = _read(open_store(layout.features(model.layer))["features"], rows)
    return model.concept_maps(torch.from_numpy(features))


@torch.no_grad()
def file_maps(model: SalfModel, config: Params, paths: Sequence[Path]) -> tuple[np.ndarray, Tensor, Tensor]:
    """(uint8 images (B, S, S, 3), concept maps (B, M, G, G), backbone logits (B, K)) of image files:
    each is resized and centre-cropped to data.image_size like prepared data, then run through the backbone."""
    from lib.models.backbones import load_backbone_checked
    from lib.models.layers import extract_layers

    with user_error_for("--image", catch=(BadImageError,), fix="pass image files Pillow can read"):
        images = np.stack([load_rgb(str(path), config.data.image_size) for path in paths])
    device = model.bottleneck.conv.weight.device
    backbone = load_backbone_checked(config.backbone)  # its own head, as the features stage ran it
    network = backbone.model.to(device)
    batch = backbone.preprocess(torch.from_numpy(images).to(device))
    features = extract_layers(network, batch, [model.layer])[model.layer]  # stops at the layer: logits need their own pass
    # the stored features are fp16: round the same way so a file and its stored row agree
    return images, model.concept_maps(features.half()), network(batch).float()


class Inputs(NamedTuple):
    """Images to explain: uint8 (B, H, W, 3), concept maps (B, M, G, G), names, the backbone's own logits (B, K)."""

    images: np.ndarray
    maps: Tensor
    names: list[str]
    backbone_logits: Tensor


def load_inputs(model: SalfModel, config: Params, layout: Layout, rows: Sequence[int], files: Sequence[Path]) -> Inputs:
    """The Inputs of store rows then files; names are "row<index>" and "file<i>_<stem>" (unique, safe as
    file names); rows' logits are the stored ones."""
    if not rows and not files:
        raise UserError("no images given: pass store rows (--index) and/or image files (--image)")
    parts = []
    if rows:
        logits = torch.from_numpy(_read(open_store(layout.logits)["logits"], rows))
        parts.append((row_images(layout, rows), row_maps(model, layout, rows), [f"row{r}" for r in rows], logits))
    if files:
        images, maps, logits = file_maps(model, config, files)
        parts.append((images, maps, [f"file{i}_{Path(f).stem}" for i, f in enumerate(files)], logits))
    device = parts[0][1].device
    return Inputs(
        np.concatenate([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        [n for p in parts for n in p[2]],
        torch.cat([p[3].to(device) for p in parts]),
    )


def parse_roi(box: str | None, mask: Path | None) -> Roi:
    """An ROI from exactly one of a box "x0,y0,x1,y1" (half-open pixel ranges) or a mask image
    (nonzero pixels are inside). Bounds are checked against the image by lib.methods.salf.explain.roi_mask."""
    if (box is None) == (mask is None):
        raise UserError("give exactly one ROI: --box x0,y0,x1,y1 or --mask path.png")
    if mask is not None:
        if not mask.exists():
            raise UserError(f"{mask}: ROI mask not found", key="--mask")
        with Image.open(mask) as image:
            return torch.from_numpy(np.asarray(image.convert("L")) > 0)
    parts = box.split(",")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"--box must be four integers x0,y0,x1,y1, got {box!r}")
    return values
