"""SALF-CBM explanations: concept contributions, heatmaps, explain-anything (ROI probe), intervention.

All functions start from concept maps c(x) (B, M, G, G) — the bottleneck's output — and a
:class:`ConceptClassifier` (pooling, train standardisation, final layer W (K, M), b (K,)).

Geometry (lib.kernels.registration.Registration, saved with the bottleneck): the value of grid cell
(h, w) is CLIP's score for a red circle whose centre, mapped to the stored image, is where the
heatmap puts it; the map is piecewise-linear between centres and constant beyond the outer ones.
That upsampling is a separable linear map U, and regions act on the grid through its adjoint —
one rule for explain-anything and intervention:

- probe: a(m | I) = sum(I * up(z_m)) = sum over cells of (U^T I U) * z_m, never materialising M
  full-resolution maps (z the standardised maps);
- intervention: the edit beta * I of the upsampled map, pooled back to the grid by each cell's
  footprint, i.e. z_m += beta * share, share = (U^T I U) / (U^T 1 U) in [0, 1] (the part of the
  cell's footprint inside I).

So a region moves exactly the cells the probe reads, also one that covers no circle centre.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lib.core.errors import UserError
from lib.kernels.registration import Registration
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
]

Roi = tuple[int, int, int, int] | Tensor  # box (x0, y0, x1, y1), half-open pixels, or a (H, W) mask


def roi_mask(roi: Roi, image_size: tuple[int, int]) -> Tensor:
    """Boolean (H, W) mask of an ROI: a box (x0, y0, x1, y1) with 0 <= x0 < x1 <= W and
    0 <= y0 < y1 <= H (half-open pixel ranges), or a non-empty (H, W) bool / 0-1 mask."""
    height, width = image_size
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
    registration: Registration,
    *,
    k: int = 5,
    classes: int | Tensor | None = None,
) -> Explanations:
    """Explain B images from their concept maps (B, M, G, G): contributions to the predicted
    (or given) class, the k concepts with the largest |contribution| and their heatmaps on the
    stored image (`registration`)."""
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
        heatmaps=registration.upsample(top_maps),
    )


def _single(maps: Tensor, clf: ConceptClassifier) -> None:
    if maps.ndim != 3 or maps.shape[0] != len(clf.concept_names):
        raise ValueError(
            f"maps must be one image's ({len(clf.concept_names)}, G, G) concept maps, got {tuple(maps.shape)}"
        )


@torch.no_grad()
def probe(clf: ConceptClassifier, maps: Tensor, roi: Roi, registration: Registration, *, k: int = 5) -> dict:
    """Explain anything: top-k concepts by a(m | I) = sum I * up(z_m) inside an ROI of the stored
    image (module doc: the region rule shared with :func:`intervene`).

    `maps` is one image's (M, G, G); z are the maps standardised per concept (see
    :meth:`ConceptClassifier.standardised_maps`). Returns a JSON-able dict.
    """
    _single(maps, clf)
    if not 1 <= k <= maps.shape[0]:
        raise ValueError(f"k must be in [1, {maps.shape[0]}] (the number of concepts), got {k}")
    mask = roi_mask(roi, registration.image_size).to(maps.device)
    scores = torch.einsum("mgh,gh->m", clf.standardised_maps(maps), registration.region_weights(mask))
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
    registration: Registration,
    target: int | None = None,
) -> dict:
    """Local intervention: c(x)[m] += beta * std_m * share, share (G, G) the part of each cell's
    footprint inside the ROI (module doc: the region rule shared with :func:`probe`), applied
    once, then re-pool and re-classify. `maps` is one image's (M, G, G), left unchanged. beta is
    in units of the concept's train std of c* (std_m): the cos^3 loss leaves the raw maps' scale
    arbitrary, so a raw beta (the paper's) would mean something different for every concept; with
    average pooling an edit of the whole image moves standardised c*[m] by beta.

    Returns a JSON-able dict with old/new top class, old/new logits, the change of c*[m] and the
    old/new logit of class `target` (default: the old prediction).
    """
    _single(maps, clf)
    index = clf.concept_index(concept)
    n_classes = len(clf.class_names)
    if target is not None and not 0 <= target < n_classes:
        raise UserError(f"class index {target} out of range; allowed integers in [0, {n_classes})")
    share = registration.region_shares(roi_mask(roi, registration.image_size).to(maps.device))
    edited = maps.clone()
    edited[index] += beta * clf.standardiser.std[index].to(edited.device) * share.to(edited.dtype)
    activations, logits = clf.classify(torch.stack([maps, edited]))
    old, new = logits.argmax(dim=1).tolist()
    target = old if target is None else target
    return {
        "concept": clf.concept_names[index],
        "concept_index": index,
        "beta": float(beta),
        "cells": int((share > 0).sum()),  # cells the edit reaches
        "cell_share": float(share.sum()),  # their summed shares: whole cells' worth of edit
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
