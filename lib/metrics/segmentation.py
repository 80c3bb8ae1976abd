"""Zero-shot segmentation scores of heatmaps (SALF-CBM Table 2), following Chefer et al. 2021.

The protocol (their `imagenet_seg_eval.py`): min-max normalise each map, call a pixel
foreground where the normalised value is strictly above the threshold (default: the map's
mean), then score

- pixel accuracy and IoU of foreground and background, pooled over the dataset
  (Σ correct / Σ pixels; per class Σ intersection / Σ union, mIoU = mean of the two classes);
- AP per image over both channels, the scores (1 − map, map) against (background, foreground)
  one-hot targets; mAP = mean over images.

`segmentation_scores` gives per-image scores and the pixel counts; `aggregate_segmentation`
pools them, so a caller can concatenate batches first. Also reported: `ap_fg`, the plain AP of
the map against the mask (not in the protocol, but what "AP of a heatmap" usually means).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from lib.metrics.spatial import check_maps_masks, tie_groups

COUNT_KEYS = ("correct", "pixels", "inter_fg", "union_fg", "inter_bg", "union_bg")


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision of each row of scores (B, N) against bool targets (B, N).

    Same definition as sklearn's `average_precision_score` (Σ ΔRecall · Precision over the
    distinct score thresholds, so tied scores enter together). Returns float64 (B,); NaN for a
    row without positives.
    """
    if scores.ndim != 2 or targets.shape != scores.shape or targets.dtype != torch.bool:
        raise ValueError(
            f"scores must be (B, N) and targets a bool tensor of the same shape; "
            f"got scores {tuple(scores.shape)}, targets {targets.dtype} {tuple(targets.shape)}"
        )
    values, order = scores.sort(dim=1, descending=True)
    positive = targets.gather(1, order)
    tp = positive.cumsum(dim=1, dtype=torch.float64)
    _, end = tie_groups(values)
    # precision at the threshold that admits a pixel's whole tie run
    precision = tp.gather(1, end - 1) / end
    return torch.where(positive, precision, 0.0).sum(dim=1) / positive.sum(dim=1)


def _normalise(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-map min-max scaling to [0, 1], and which maps are constant (B, 1, 1). A constant map
    becomes all 0: the reference's 0/0 gives NaN, which it then zeroes."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    constant = span == 0
    return torch.where(constant, 0.0, (maps - low) / span), constant


def segmentation_scores(
    maps: Tensor, masks: Tensor, threshold: Literal["mean"] | float = "mean"
) -> dict[str, Tensor]:
    """Per-image zero-shot segmentation scores of heatmaps against foreground masks.

    maps: float (B, H, W), any range; masks: bool (B, H, W), True = foreground.
    threshold: "mean" (the protocol: each normalised map's mean) or a float in [0, 1] applied
    to the min-max normalised maps. Foreground is `normalised > threshold`.
    Returns a dict of (B,) tensors: float64 `pixel_acc`, `iou_fg`, `iou_bg`, `miou` (mean of
    the defined IoUs), `ap` (the protocol's two-channel AP), `ap_fg` (AP of the map vs the mask,
    NaN for an empty mask); int64 counts `COUNT_KEYS` for `aggregate_segmentation`. An IoU is
    NaN where its class is absent from both prediction and mask.
    """
    check_maps_masks(maps, masks)
    # fp16 maps from the stores are scaled in float32 at least
    norm, constant = _normalise(maps.to(torch.promote_types(maps.dtype, torch.float32)))
    if threshold == "mean":
        cut = norm.mean(dim=(1, 2), keepdim=True)
    elif isinstance(threshold, float | int) and not isinstance(threshold, bool) and 0 <= threshold <= 1:
        cut = float(threshold)
    else:
        raise ValueError(f"threshold must be 'mean' or a float in [0, 1]; got {threshold!r}")
    fg = norm > cut
    b = maps.shape[0]

    def count(x: Tensor) -> Tensor:
        return x.sum(dim=(1, 2))

    counts = {
        "correct": count(fg == masks),
        "pixels": torch.full((b,), masks.shape[1] * masks.shape[2], device=masks.device),
        "inter_fg": count(fg & masks),
        "union_fg": count(fg | masks),
        "inter_bg": count(~fg & ~masks),
        "union_bg": count(~fg | ~masks),
    }
    iou_fg = counts["inter_fg"] / counts["union_fg"].to(torch.float64)
    iou_bg = counts["inter_bg"] / counts["union_bg"].to(torch.float64)
    # the reference zeroes both AP channels of a constant map (NaN -> 0), so its AP is the prevalence
    background = torch.where(constant, 0.0, 1 - norm).flatten(1)
    flat, target = norm.flatten(1), masks.flatten(1)
    return {
        "pixel_acc": counts["correct"] / counts["pixels"].to(torch.float64),
        "iou_fg": iou_fg,
        "iou_bg": iou_bg,
        "miou": torch.stack([iou_fg, iou_bg]).nanmean(dim=0),
        "ap": average_precision(torch.cat([background, flat], dim=1), torch.cat([~target, target], dim=1)),
        "ap_fg": average_precision(flat, target),
        **counts,
    }


def aggregate_segmentation(scores: Mapping[str, Tensor]) -> dict[str, float]:
    """Dataset-level numbers from (concatenated) `segmentation_scores` outputs, as reported by
    Chefer et al. and SALF-CBM: `pixel_acc` = Σ correct / Σ pixels, `miou` = mean over
    foreground/background of Σ intersection / Σ union, `map` = mean per-image `ap`; plus
    `map_fg` = mean of the defined `ap_fg`. Returns Python floats; `miou` is NaN if a class is
    absent from every prediction and mask.
    """
    missing = [k for k in (*COUNT_KEYS, "ap", "ap_fg") if k not in scores]
    if missing:
        raise ValueError(f"scores is missing keys {missing}; pass the output of segmentation_scores")
    total = {k: scores[k].sum().item() for k in COUNT_KEYS}
    iou = [total[f"inter_{c}"] / total[f"union_{c}"] if total[f"union_{c}"] else math.nan for c in ("fg", "bg")]
    return {
        "pixel_acc": total["correct"] / total["pixels"],
        "miou": sum(iou) / 2,
        "map": scores["ap"].mean().item(),
        "map_fg": scores["ap_fg"].nanmean().item(),
    }
