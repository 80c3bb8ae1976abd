"""SALF-CBM explanations: concept contributions, heatmaps, explain-anything (ROI probe), intervention.

All functions start from concept maps c(x) (B, M, G, G) — the bottleneck's output — and a
:class:`ConceptClassifier` (pooling, train standardisation, final layer W (K, M), b (K,)).

Heatmaps: the value of grid cell (h, w) is CLIP's score for a red circle centred on pixel
(d (h + 1), d (w + 1)), d = floor(size / (G + 1)) (lib.kernels.rings.grid_centers). Upsampling is
piecewise-linear between those centres and constant beyond the outer ones, rather than a plain
bilinear resize that would put cell centres at (h + 1/2) size / G. It is a separable linear map
U_h c U_w^T, so the sum of an upsampled map over an ROI mask I is c . (U_h^T I U_w): the probe
never materialises M full-resolution maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lib.core.errors import UserError
from lib.kernels.rings import grid_centers
from lib.methods.salf.classifier import ConceptClassifier

__all__ = [
    "Contributions",
    "Explanations",
    "Roi",
    "contributions",
    "explain_batch",
    "intervene",
    "probe",
    "roi_mask",
    "top_activating",
    "upsample_maps",
]

Roi = tuple[int, int, int, int] | Tensor  # box (x0, y0, x1, y1), half-open pixels, or a (H, W) mask


def _ticks(size: int, grid: int, device: torch.device) -> Tensor:
    """(grid,) pixel coordinates of the prompt centres along an axis of `size` pixels."""
    return grid_centers(size, grid, device=device)[:grid, 1]  # x of the first row = the 1-D centres


def _interpolation(size: int, grid: int, device: torch.device) -> Tensor:
    """(size, grid) matrix: piecewise-linear interpolation between the prompt-grid centres."""
    ticks = _ticks(size, grid, device)
    spacing = float(ticks[1] - ticks[0]) if grid > 1 else 1.0
    pixels = torch.arange(size, dtype=torch.float32, device=device)
    weights = (1 - (pixels[:, None] - ticks[None, :]).abs() / spacing).clamp_min(0)
    weights[pixels < ticks[0], 0] = 1
    weights[pixels > ticks[-1], -1] = 1
    return weights


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    if len(image_size) != 2 or min(image_size) < 2:
        raise ValueError(f"image_size must be (H, W) with H, W >= 2, got {image_size}")
    return int(image_size[0]), int(image_size[1])


def upsample_maps(maps: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Upsample (..., G, G) concept maps to (..., H, W) between the prompt-grid centres."""
    height, width = _check_size(image_size)
    grid = maps.shape[-1]
    if maps.ndim < 2 or maps.shape[-2] != grid:
        raise ValueError(f"maps must end in a square (G, G) grid, got {tuple(maps.shape)}")
    rows = _interpolation(height, grid, maps.device)
    cols = _interpolation(width, grid, maps.device)
    return torch.einsum("...gh,yg,xh->...yx", maps.to(torch.float32), rows, cols)


def roi_mask(roi: Roi, image_size: tuple[int, int]) -> Tensor:
    """Boolean (H, W) mask of an ROI: a box (x0, y0, x1, y1) with 0 <= x0 < x1 <= W and
    0 <= y0 < y1 <= H (half-open pixel ranges), or a non-empty (H, W) bool / 0-1 mask."""
    height, width = _check_size(image_size)
    if isinstance(roi, Tensor):
        if roi.shape != (height, width):
            raise UserError(f"ROI mask must have shape ({height}, {width}), got {tuple(roi.shape)}")
        if roi.dtype != torch.bool and not bool(((roi == 0) | (roi == 1)).all()):
            raise UserError("ROI mask must be boolean or contain only 0 and 1")
        mask = roi.to(torch.bool)
        if not bool(mask.any()):
            raise UserError("ROI mask is empty; it must select at least one pixel")
        return mask
    if len(roi) != 4:
        raise UserError(f"ROI box must be (x0, y0, x1, y1), got {roi!r}")
    x0, y0, x1, y1 = (int(v) for v in roi)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise UserError(
            f"ROI box {roi!r} is empty or outside the {width}x{height} image; "
            f"need 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
        )
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _class_indices(classes: int | Tensor | None, logits: Tensor) -> Tensor:
    n_classes = logits.shape[1]
    if classes is None:
        return logits.argmax(dim=1)
    chosen = torch.as_tensor(classes, device=logits.device)
    if chosen.ndim > 1 or (chosen.ndim == 1 and chosen.shape[0] != logits.shape[0]):
        raise ValueError(f"classes must be an int or a ({logits.shape[0]},) tensor, got shape {tuple(chosen.shape)}")
    chosen = chosen.expand(logits.shape[0])
    if chosen.dtype.is_floating_point or bool(((chosen < 0) | (chosen >= n_classes)).any()):
        raise UserError(f"class index {classes} out of range; allowed integers in [0, {n_classes})")
    return chosen.long()


class Contributions(NamedTuple):
    """What :func:`contributions` returns."""

    scores: Tensor  # (B, M) W[l, m] c*(x)[m]
    classes: Tensor  # (B,) int64, the explained class l
    logits: Tensor  # (B, K)
    activations: Tensor  # (B, M) standardised c*


def contributions(clf: ConceptClassifier, maps: Tensor, classes: int | Tensor | None = None) -> Contributions:
    """Contributions S(x, m, l) = W[l, m] c*(x)[m] for class l (default: the predicted one).

    scores.sum(1) + b[l] equals logits[:, l] (up to float rounding).
    """
    activations, logits = clf.classify(maps)
    chosen = _class_indices(classes, logits)
    return Contributions(clf.weight.to(maps.device)[chosen] * activations, chosen, logits, activations)


@dataclass(frozen=True)
class Explanations:
    """A batch of explanations: top-k concepts by |contribution| to one class per image."""

    logits: Tensor  # (B, K)
    classes: Tensor  # (B,) explained class
    activations: Tensor  # (B, M) standardised c*
    scores: Tensor  # (B, M) contributions to the explained class
    top: Tensor  # (B, k) concept indices, largest |contribution| first
    heatmaps: Tensor  # (B, k, H, W) upsampled raw concept maps of the top concepts

    def record(self, i: int, clf: ConceptClassifier) -> dict:
        """JSON-able numbers for image i (heatmaps left out)."""
        cls = int(self.classes[i])
        predicted = int(self.logits[i].argmax())
        return {
            "predicted": predicted,
            "predicted_name": clf.class_names[predicted],
            "class": cls,
            "class_name": clf.class_names[cls],
            "logit": float(self.logits[i, cls]),
            "bias": float(clf.bias[cls]),
            "concepts": [
                {
                    "index": int(m),
                    "name": clf.concept_names[int(m)],
                    "contribution": float(self.scores[i, m]),
                    "activation": float(self.activations[i, m]),
                    "weight": float(clf.weight[cls, m]),
                }
                for m in self.top[i].tolist()
            ],
        }


@torch.no_grad()
def explain_batch(
    clf: ConceptClassifier,
    maps: Tensor,
    image_size: tuple[int, int],
    *,
    k: int = 5,
    classes: int | Tensor | None = None,
) -> Explanations:
    """Explain B images from their concept maps (B, M, G, G): contributions to the predicted
    (or given) class, the k concepts with the largest |contribution| and their heatmaps."""
    n_concepts = maps.shape[1]
    if not 1 <= k <= n_concepts:
        raise ValueError(f"k must be in [1, {n_concepts}] (the number of concepts), got {k}")
    result = contributions(clf, maps, classes)
    top = result.scores.abs().topk(k, dim=1).indices
    top_maps = maps.gather(1, top[:, :, None, None].expand(-1, -1, *maps.shape[2:]))
    return Explanations(
        logits=result.logits,
        classes=result.classes,
        activations=result.activations,
        scores=result.scores,
        top=top,
        heatmaps=upsample_maps(top_maps, image_size),
    )


def _single(maps: Tensor, clf: ConceptClassifier) -> None:
    if maps.ndim != 3 or maps.shape[0] != len(clf.concept_names):
        raise ValueError(
            f"maps must be one image's ({len(clf.concept_names)}, G, G) concept maps, got {tuple(maps.shape)}"
        )


@torch.no_grad()
def probe(clf: ConceptClassifier, maps: Tensor, roi: Roi, image_size: tuple[int, int], *, k: int = 5) -> dict:
    """Explain anything: top-k concepts by a(m | I) = sum I * up(c(x)[m]) inside an ROI.

    `maps` is one image's (M, G, G); maps are standardised per concept first (see
    :meth:`ConceptClassifier.standardised_maps`). Returns a JSON-able dict.
    """
    _single(maps, clf)
    if not 1 <= k <= maps.shape[0]:
        raise ValueError(f"k must be in [1, {maps.shape[0]}] (the number of concepts), got {k}")
    mask = roi_mask(roi, image_size).to(maps.device, torch.float32)
    rows = _interpolation(mask.shape[0], maps.shape[-1], maps.device)
    cols = _interpolation(mask.shape[1], maps.shape[-1], maps.device)
    cell_weights = rows.T @ mask @ cols  # (G, G): adjoint of the upsampling applied to I
    scores = torch.einsum("mgh,gh->m", clf.standardised_maps(maps), cell_weights)
    values, indices = scores.topk(k)
    return {
        "roi_pixels": int(mask.sum()),
        "concepts": [
            {"index": m, "name": clf.concept_names[m], "score": s} for m, s in zip(indices.tolist(), values.tolist())
        ],
    }


@torch.no_grad()
def intervene(
    clf: ConceptClassifier,
    maps: Tensor,
    concept: int | str,
    roi: Roi,
    beta: float,
    image_size: tuple[int, int],
    target: int | None = None,
) -> dict:
    """Local intervention: c(x)[m] += beta * std_m on the grid cells whose prompt centre lies in
    the ROI, applied once, then re-pool and re-classify. `maps` is one image's (M, G, G), left
    unchanged. beta is in units of the concept's train std of c* (std_m): the cos^3 loss leaves
    the raw maps' scale arbitrary, so a raw beta (the paper's) would mean something different for
    every concept; with average pooling an edit of the whole grid moves standardised c*[m] by beta.

    Returns a JSON-able dict with old/new top class, old/new logits, the change of c*[m] and the
    old/new logit of class `target` (default: the old prediction).
    """
    _single(maps, clf)
    index = clf.concept_index(concept)
    n_classes = len(clf.class_names)
    if target is not None and not 0 <= target < n_classes:
        raise UserError(f"class index {target} out of range; allowed integers in [0, {n_classes})")
    mask = roi_mask(roi, image_size).to(maps.device)
    grid = maps.shape[-1]
    ys = _ticks(mask.shape[0], grid, maps.device).long()
    xs = _ticks(mask.shape[1], grid, maps.device).long()
    cells = mask[ys][:, xs]  # (G, G): the ROI sampled at the prompt centres
    if not bool(cells.any()):
        raise ValueError(
            f"ROI {roi if not isinstance(roi, Tensor) else 'mask'} covers no concept-grid cell; "
            f"cell centres are at rows {ys.tolist()} and columns {xs.tolist()}"
        )
    edited = maps.clone()
    edited[index] += beta * clf.standardiser.std[index].to(edited.device) * cells.to(edited.dtype)
    activations, logits = clf.classify(torch.stack([maps, edited]))
    old, new = logits.argmax(dim=1).tolist()
    target = old if target is None else target
    return {
        "concept": clf.concept_names[index],
        "concept_index": index,
        "beta": float(beta),
        "cells": int(cells.sum()),
        "delta_activation": float(activations[1, index] - activations[0, index]),
        "old_class": old,
        "old_class_name": clf.class_names[old],
        "new_class": new,
        "new_class_name": clf.class_names[new],
        "old_logits": logits[0].tolist(),
        "new_logits": logits[1].tolist(),
        "target_class": target,
        "target_class_name": clf.class_names[target],
        "target_logit_change": float(logits[1, target] - logits[0, target]),
    }


@torch.no_grad()
def top_activating(activations: Iterable[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Streaming top-k images per concept over batches of c* (B, M), in order.

    Returns (values (M, k), image indices (M, k) int64 counted across the stream), highest first.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    best_values = best_indices = None
    offset = 0
    for batch in activations:
        if batch.ndim != 2:
            raise ValueError(f"activation batches must be (B, M), got {tuple(batch.shape)}")
        values = batch.T.to(torch.float32)  # (M, B)
        indices = torch.arange(offset, offset + batch.shape[0], device=batch.device).expand_as(values)
        offset += batch.shape[0]
        if best_values is not None:
            values = torch.cat([best_values, values], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
        keep = values.topk(min(k, values.shape[1]), dim=1).indices
        best_values, best_indices = values.gather(1, keep), indices.gather(1, keep)
    if best_values is None or offset < k:
        raise ValueError(f"need at least k={k} images, got {offset}")
    return best_values, best_indices
