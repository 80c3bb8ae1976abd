"""Augmented epochs for CE-FAM's translator, as the authors' train.py trains it.

Every epoch each training image is cropped at random (torchvision's RandomResizedCrop: area share
in `scale`, aspect ratio log-uniform in [3/4, 4/3], ten tries, else the centre crop of the
clamped ratio), flipped left-right with probability 1/2 and resized back to the stored side. The
frozen backbone gives z_cat of that crop and the frozen CLIP its target embedding of the *same*
crop (train.py recomputes `get_image_features` on every batch), in batches on the device. The
crops and flips depend on (seed, epoch) alone, so a resumed run sees the batches an uninterrupted
one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import Tensor

from lib.core.streams import read_rows
from lib.methods.cefam.training import EpochSource
from lib.models.backbones import LoadedBackbone
from lib.models.clip import LoadedClip
from lib.models.layers import extract_layers

__all__ = ["augmented_source", "crop_boxes", "crop_encoder", "resized_crops"]

Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]  # uint8 images (B, H, W, 3) -> (z_cat (B, C), target (B, D))

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios
TRIES = 10


def crop_boxes(rng: np.random.Generator, n: int, height: int, width: int, scale: Sequence[float]) -> np.ndarray:
    """RandomResizedCrop boxes (n, 4) int64 rows (top, left, h, w), drawn as torchvision draws them:
    up to ten (area, ratio) tries per image, the first that fits wins; none fits: the centre crop
    of the ratio clamped to [3/4, 4/3]."""
    area = height * width
    log_ratio = np.log(RATIO)
    target = area * rng.uniform(scale[0], scale[1], size=(n, TRIES))
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=(n, TRIES)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    u_top, u_left = rng.random((n, TRIES)), rng.random((n, TRIES))
    boxes = np.empty((n, 4), dtype=np.int64)
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        fallback_w, fallback_h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        fallback_w, fallback_h = round(height * RATIO[1]), height
    else:
        fallback_w, fallback_h = width, height
    for i in range(n):
        hits = np.flatnonzero(fits[i])
        if len(hits) == 0:
            boxes[i] = ((height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w)
            continue
        t = hits[0]
        top = int(u_top[i, t] * (height - h[i, t] + 1))  # uniform over 0..height - h
        left = int(u_left[i, t] * (width - w[i, t] + 1))
        boxes[i] = (top, left, h[i, t], w[i, t])
    return boxes


def resized_crops(images: Tensor, boxes: Tensor, flips: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop box b of image b (top, left, h, w in pixels), flip it left-right where flips[b], and
    resize it to size = (height, width) (bilinear): uint8 (B, H, W, 3) -> uint8 (B, *size, 3).

    One grid_sample for the whole batch, each image with its own affine map from output to source
    coordinates (pixel edges; align_corners=False), so it runs on the images' device. Equal to
    torchvision's bilinear resized_crop (crop, then resize) to uint8 rounding when upsampling;
    downsampling (a crop larger than `size`) skips torchvision's antialiasing.
    """
    b, height, width, _ = images.shape
    x = images.permute(0, 3, 1, 2).float()
    boxes = boxes.to(x)
    top, left, h, w = boxes.unbind(dim=1)
    sign = 1.0 - 2.0 * flips.to(x)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, 3, *size], align_corners=False)  # (B, h', w', 2): x, y in [-1, 1]
    # clamp to the crop's outer pixel centres, so its edge pixels repeat instead of blending in
    # their neighbours outside the box: what cropping first and then resizing (torchvision) gives
    for axis, (start, extent, side) in enumerate(((left, w, width), (top, h, height))):
        centre = ((grid[..., axis] + 1) * side - 1) / 2  # pixel-centre coordinates
        low, high = start[:, None, None], (start + extent - 1)[:, None, None]
        grid[..., axis] = (torch.maximum(torch.minimum(centre, high), low) * 2 + 1) / side - 1
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def crop_encoder(backbone: LoadedBackbone, layers: Sequence[str], clip: LoadedClip, raw: bool) -> Encoder:
    """z_cat (global average pools of `layers`, concatenated) and the CLIP embedding of the same
    images, raw or L2-normalised; both models frozen (no gradients)."""

    @torch.no_grad()
    def encode(images: Tensor) -> tuple[Tensor, Tensor]:
        maps = extract_layers(backbone.model, backbone.preprocess(images), list(layers))
        z = torch.cat([maps[layer].float().mean(dim=(2, 3)) for layer in layers], dim=1)
        emb = clip.model.encode_image(clip.preprocess(images)).float()
        return z, emb if raw else F.normalize(emb, dim=-1)

    return encode


def augmented_source(
    images: zarr.Array,
    rows: np.ndarray,
    batch_size: int,
    encode: Encoder,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    seed: int = 0,
    device: torch.device | str = "cpu",
    in_memory_mb: float = 1024.0,
) -> EpochSource:
    """Batches of (z_cat, target) of fresh crops of the images at store rows `rows`, shuffled per
    epoch. The uint8 images stay on the device when they fit in `in_memory_mb`; else each batch
    is read from the store."""
    rows = np.sort(np.asarray(rows))
    _, height, width, _ = images.shape
    size_mb = len(rows) * height * width * 3 / 2**20
    held = torch.from_numpy(read_rows(images, rows)).to(device) if size_mb <= in_memory_mb else None

    def load(positions: np.ndarray) -> Tensor:
        if held is not None:
            return held[torch.from_numpy(positions).to(held.device)]
        order = np.argsort(positions)  # read_rows wants increasing rows; put them back in batch order
        block = read_rows(images, rows[positions[order]])
        return torch.from_numpy(block[np.argsort(order)]).to(device)

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(rows))
        boxes = crop_boxes(rng, len(rows), height, width, scale)
        flips = rng.random(len(rows)) < 0.5
        for start in range(0, len(rows), batch_size):
            part = order[start : start + batch_size]
            crops = resized_crops(
                load(part), torch.from_numpy(boxes[part]).to(device), torch.from_numpy(flips[part]).to(device), (height, width)
            )
            yield encode(crops)

    return batches
