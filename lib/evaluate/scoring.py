"""Batch-by-batch accumulation of the evaluation scores of one method.

Each batch's maps are reduced to per-(image, concept) or per-image scores right away and only
those small vectors are kept, so memory grows with the number of scored pairs, not pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lib.metrics.segmentation import aggregate_segmentation, segmentation_scores
from lib.metrics.spatial import (
    best_candidate,
    cefam_lower_iou_curve,
    epg,
    hit_with_coverage,
    ideal_iou_curve,
    iou_curve,
    nra_chance_from_curves,
    nra_from_curves,
    random_iou_curve,
    summarise_by_type,
)

SEGMENTATION_KEYS = ("pixel_acc", "miou", "map")


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Float maps (P, h, w) resized bilinearly to (P, *size), float32 (a no-op at that size)."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be (P, h, w); got shape {tuple(maps.shape)}")
    maps = maps.to(torch.float32)
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class CurveMean:
    """Running mean of (P, T) curves."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, curves: Tensor) -> None:
        part = curves.sum(dim=0).cpu()
        self.total = part if self.total is None else self.total + part
        self.count += curves.shape[0]

    def mean(self) -> Tensor | None:
        """The mean curve (T,), float64, or None before any row."""
        return None if self.total is None else self.total / self.count


CONCEPT_KEYS = ("nra", "nra_chance", "epg", "hit", "coverage")


class ConceptMapScores:
    """CE-FAM's metrics of one method's concept maps, per concept type, plus its mean IoU curve.

    Rows are all ground-truth (image, concept) pairs: the concept is present in the image and its
    mask is neither empty nor the whole image (NRA is undefined there, and so are the other
    metrics, so every metric averages over the same rows). On the pairs whose concept the method
    has a map for: `nra` (CE-FAM's, lower curve a·n), `nra_chance` (ours, lower curve = chance),
    `epg` (maps min-max rescaled; a constant map scores 0), `hit` (nra > threshold). A pair
    without a map has NaN NRA/EPG but counts as a miss in `hit` (CE-FAM's Hit rate is over all
    pairs), and `coverage` is 1 where the method has a map, 0 where not. Candidate maps (B, M', K,
    h, w): each pair is scored with its candidate of best NRA (all metrics of that one).
    """

    def __init__(self, concept_types: Sequence[str], fractions: Tensor, hit_threshold: float) -> None:
        self.concept_types = tuple(concept_types)
        self.fractions = fractions
        self.hit_threshold = hit_threshold
        self.curve = CurveMean()
        self.rows: dict[str, list[Tensor]] = {key: [] for key in (*CONCEPT_KEYS, "concept")}

    def add(self, maps: Tensor, concepts: Tensor, masks: Tensor) -> None:
        """Score maps (B, M', [K,] h, w) of ground-truth concepts `concepts` (M',) against masks
        bool (B, K_gt, H, W), over every pair where a ground-truth concept is present."""
        if concepts.numel() and not (0 <= int(concepts.min()) and int(concepts.max()) < masks.shape[1]):
            raise ValueError(f"concept ids must lie in [0, {masks.shape[1]}); got {concepts.tolist()}")
        if maps.ndim not in (4, 5) or maps.shape[:2] != (masks.shape[0], concepts.numel()):
            raise ValueError(f"maps must have shape ({masks.shape[0]}, {concepts.numel()}, [K,] h, w); got {tuple(maps.shape)}")
        size = tuple(masks.shape[2:])
        area = masks.flatten(2).sum(dim=2)  # (B, K_gt)
        image, concept = ((area > 0) & (area < size[0] * size[1])).nonzero(as_tuple=True)
        if image.numel() == 0:
            return
        column = torch.full((masks.shape[1],), -1, dtype=torch.int64, device=masks.device)
        column[concepts.to(masks.device)] = torch.arange(concepts.numel(), device=masks.device)
        covered = column[concept] >= 0
        undefined = torch.full((image.numel(),), math.nan, dtype=torch.float64, device=masks.device)
        values = {key: undefined.clone() for key in ("nra", "nra_chance", "epg")}
        if covered.any():
            b, j = image[covered], column[concept[covered]]
            truth = masks[b, concept[covered]]
            # select the scored pairs before resizing: M' may be thousands of concepts
            chosen = maps.to(masks.device)[b, j]  # (P, [K,] h, w)
            if chosen.ndim == 4:
                chosen = _best_candidates(chosen, truth, self.fractions.to(masks.device))
            selected = resize_maps(chosen, size)
            curves = iou_curve(selected, truth, self.fractions.to(selected.device))
            self.curve.add(curves)
            values["nra"][covered] = nra_from_curves(curves, truth, self.fractions)
            values["nra_chance"][covered] = nra_chance_from_curves(curves, truth, self.fractions)
            values["epg"][covered] = epg(selected, truth)
        values["hit"] = hit_with_coverage(values["nra"], covered, self.hit_threshold)
        values["coverage"] = covered.to(torch.float64)
        for key in CONCEPT_KEYS:
            self.rows[key].append(values[key].cpu())
        self.rows["concept"].append(concept.cpu())

    @property
    def n_pairs(self) -> int:
        """Ground-truth pairs the method had a map for."""
        return int(sum(c.sum() for c in self.rows["coverage"]))

    def summary(self) -> dict[str, dict[str, float]]:
        """{"avg": {metric: value}, TYPE: {...}}: means per concept type, then over types."""
        if not self.n_pairs:
            return {}
        types = [self.concept_types[k] for k in torch.cat(self.rows["concept"]).tolist()]
        return summarise_by_type({key: torch.cat(self.rows[key]) for key in CONCEPT_KEYS}, types)


def _best_candidates(candidates: Tensor, truth: Tensor, fractions: Tensor) -> Tensor:
    """The candidate map (P, h, w) of best NRA among (P, K, h, w), against masks (P, H, W).

    Both NRAs rise with the map's IoU AUC, so either picks the same candidate; unclamped CE-FAM
    NRA keeps candidates below its lower curve apart.
    """
    p, k = candidates.shape[:2]
    resized = resize_maps(candidates.flatten(0, 1), tuple(truth.shape[1:]))
    repeated = truth.repeat_interleave(k, dim=0)
    scores = nra_from_curves(iou_curve(resized, repeated, fractions), repeated, fractions, clamp=False).view(p, k)
    *_, index = best_candidate(scores)
    return candidates[torch.arange(p, device=candidates.device), index]


def reference_curves(masks: Tensor, fractions: Tensor) -> dict[str, Tensor]:
    """Reference IoU curves (P, T) of every scored pair of a batch, masks bool (B, K, H, W):
    "chance" (a random selection), "ideal" (the mask ranked first) and "cefam_lower" (CE-FAM's a·n)."""
    area = masks.flatten(2).sum(dim=2)
    truth = masks[(area > 0) & (area < masks.shape[2] * masks.shape[3])]  # (P, H, W)
    fractions = fractions.to(masks.device)
    return {
        "chance": random_iou_curve(truth, fractions),
        "ideal": ideal_iou_curve(truth, fractions),
        "cefam_lower": cefam_lower_iou_curve(truth, fractions),
    }


class SegmentationScores:
    """Zero-shot segmentation of one method's class maps, pooled over the images that have a target."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Tensor]] = []

    def add(self, maps: Tensor, targets: Tensor) -> None:
        """maps float (B, h, w); targets bool (B, H, W) (all False = no target: skipped)."""
        if maps.ndim != 3 or maps.shape[0] != targets.shape[0]:
            raise ValueError(f"class maps must have shape ({targets.shape[0]}, h, w); got {tuple(maps.shape)}")
        keep = targets.flatten(1).any(dim=1)
        if not keep.any():
            return
        selected = resize_maps(maps.to(targets.device)[keep], tuple(targets.shape[1:]))
        scores = segmentation_scores(selected, targets[keep])
        self.parts.append({k: v.cpu() for k, v in scores.items()})

    @property
    def n_images(self) -> int:
        return sum(len(p["ap"]) for p in self.parts)

    def summary(self) -> dict[str, float]:
        """{"pixel_acc", "miou", "map"} over every image added ({} if none)."""
        if not self.parts:
            return {}
        pooled = aggregate_segmentation({k: torch.cat([p[k] for p in self.parts]) for k in self.parts[0]})
        return {k: pooled[k] for k in SEGMENTATION_KEYS}

