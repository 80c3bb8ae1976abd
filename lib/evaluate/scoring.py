"""Batch-by-batch accumulation of the evaluation scores of one method.

Each batch's maps are reduced to per-(image, concept) or per-image scores right away and only
those small vectors are kept, so memory grows with the number of scored pairs, not pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lib.metrics.segmentation import aggregate_segmentation, segmentation_scores
from lib.metrics.spatial import epg, hit, ideal_iou_curve, iou_curve, nra_from_curves, random_iou_curve, summarise_by_type

SEGMENTATION_KEYS = ("pixel_acc", "miou", "map")


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Float maps (P, h, w) resized bilinearly to (P, *size), float32 (a no-op at that size)."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be (P, h, w); got shape {tuple(maps.shape)}")
    maps = maps.to(torch.float32)
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def present_pairs(masks: Tensor, concepts: Tensor) -> tuple[Tensor, Tensor]:
    """(image, channel) pairs where ground-truth concept `concepts[channel]` is present.

    masks: bool (B, K, H, W); concepts: int64 (M',). Returns two int64 (P,) tensors.
    """
    present = masks[:, concepts.to(masks.device)].flatten(2).any(dim=2)  # (B, M')
    return present.nonzero(as_tuple=True)


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


class ConceptMapScores:
    """NRA, EPG and Hit of one method's concept maps, per concept type, plus its mean IoU curve."""

    def __init__(self, concept_types: Sequence[str], fractions: Tensor, hit_threshold: float) -> None:
        self.concept_types = tuple(concept_types)
        self.fractions = fractions
        self.hit_threshold = hit_threshold
        self.curve = CurveMean()
        self.rows: dict[str, list[Tensor]] = {"nra": [], "epg": [], "concept": []}

    def add(self, maps: Tensor, concepts: Tensor, masks: Tensor) -> None:
        """Score maps (B, M', h, w) of ground-truth concepts `concepts` (M',) against masks
        bool (B, K, H, W), on the pairs where the concept is present."""
        if concepts.numel() and not (0 <= int(concepts.min()) and int(concepts.max()) < masks.shape[1]):
            raise ValueError(f"concept ids must lie in [0, {masks.shape[1]}); got {concepts.tolist()}")
        if maps.shape[:2] != (masks.shape[0], concepts.numel()):
            raise ValueError(f"maps must have shape ({masks.shape[0]}, {concepts.numel()}, h, w); got {tuple(maps.shape)}")
        image, channel = present_pairs(masks, concepts)
        if image.numel() == 0:
            return
        concept = concepts.to(masks.device)[channel]
        # select the scored pairs before resizing: M' may be thousands of concepts
        selected = resize_maps(maps.to(masks.device)[image, channel], tuple(masks.shape[2:]))
        truth = masks[image, concept]
        curves = iou_curve(selected, truth, self.fractions.to(selected.device))
        self.curve.add(curves)
        self.rows["nra"].append(nra_from_curves(curves, truth, self.fractions).cpu())
        self.rows["epg"].append(epg(selected, truth).cpu())
        self.rows["concept"].append(concept.cpu())

    @property
    def n_pairs(self) -> int:
        return sum(len(c) for c in self.rows["concept"])

    def summary(self) -> dict[str, dict[str, float]]:
        """{"avg": {"nra", "epg", "hit"}, TYPE: {...}}: means per concept type, then over types."""
        if not self.n_pairs:
            return {}
        values = {name: torch.cat(self.rows[name]) for name in ("nra", "epg")}
        values["hit"] = hit(values["nra"], self.hit_threshold)
        types = [self.concept_types[k] for k in torch.cat(self.rows["concept"]).tolist()]
        return summarise_by_type({k: values[k] for k in ("nra", "epg", "hit")}, types)


def reference_curves(masks: Tensor, fractions: Tensor) -> tuple[Tensor, Tensor]:
    """Chance and ideal IoU curves (P, T) of every present concept of a batch, masks bool (B, K, H, W)."""
    present = masks.flatten(2).any(dim=2)
    truth = masks[present]  # (P, H, W)
    fractions = fractions.to(masks.device)
    return random_iou_curve(truth, fractions), ideal_iou_curve(truth, fractions)


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

