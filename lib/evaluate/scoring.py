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
    auc_from_curves,
    authors_best_candidate,
    best_candidate,
    cefam_lower_iou_curve,
    epg,
    hit_with_coverage,
    ideal_iou_curve,
    iou_curve,
    nra_authors_parts,
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


CONCEPT_KEYS = ("nra", "nra_chance", "epg", "hit", "coverage")  # the summary table's columns
PROTOCOL_KEYS = {
    "paper": ("nra", "nra_chance", "epg", "hit", "auc", "auc_high", "auc_low"),
    "authors": ("nra_authors", "epg_authors", "hit_authors", "auc_authors", "auc_high_authors", "auc_low_authors"),
}
SHARE_PREFIX = {"paper": "layer_share_", "authors": "layer_share_authors_"}  # + source name (CE-FAM Fig. A1)


class ConceptMapScores:
    """CE-FAM's metrics of one method's concept maps, per concept type, plus its mean IoU curve.

    Rows are all ground-truth (image, concept) pairs: the concept is present in the image and its
    mask is neither empty nor the whole image (NRA is undefined there, and so are the other
    metrics, so every metric averages over the same rows). `coverage` is 1 where the method has a
    map for the pair, 0 where not; a pair without a map has NaN scores but counts as a miss in
    every Hit (CE-FAM's Hit rate is over all pairs). Per protocol (lib/metrics/spatial.py):

    * "paper": `nra` (CE-FAM's eq. 13, lower curve a·n), `nra_chance` (ours, lower curve =
      chance), `epg` (maps min-max rescaled; a constant map scores 0), `hit` (nra > threshold),
      and the unnormalised areas `auc`, `auc_high`, `auc_low` (Table A4). Candidate maps
      (B, M', K, h, w): the candidate of best NRA is scored, its EPG kept whatever its NRA.
    * "authors": the same from the authors' evaluate.py: `nra_authors`, `epg_authors`,
      `hit_authors`, `auc_authors`, `auc_high_authors`, `auc_low_authors`; the first candidate
      whose NRA beats the running best from 0 is chosen, and where none does NRA and EPG are 0.

    With candidate sources (ConceptMaps.sources), `layer_share_<name>` / `layer_share_authors_<name>`
    is the share of the pairs whose chosen candidate came from each source (Fig. A1; pairs where
    the authors' choice picks none are left out of theirs).
    """

    def __init__(
        self, concept_types: Sequence[str], fractions: Tensor, hit_threshold: float, protocols: Sequence[str] = ("paper", "authors")
    ) -> None:
        unknown = set(protocols) - set(PROTOCOL_KEYS)
        if unknown or not protocols:
            raise ValueError(f"protocols must be a non-empty subset of {tuple(PROTOCOL_KEYS)}; got {list(protocols)}")
        self.concept_types = tuple(concept_types)
        self.fractions = fractions
        self.hit_threshold = hit_threshold
        self.protocols = tuple(protocols)
        self.curve = CurveMean()
        self.source_names: tuple[str, ...] = ()
        self.rows: dict[str, list[Tensor]] = {key: [] for key in (*self.keys, "concept")}

    @property
    def keys(self) -> tuple[str, ...]:
        """The metric keys this scorer writes, in order."""
        shares = tuple(SHARE_PREFIX[p] + name for p in self.protocols for name in self.source_names)
        return (*(k for p in self.protocols for k in PROTOCOL_KEYS[p]), "coverage", *shares)

    def add(
        self, maps: Tensor, concepts: Tensor, masks: Tensor, sources: Tensor | None = None, source_names: Sequence[str] = ()
    ) -> None:
        """Score maps (B, M', [K,] h, w) of ground-truth concepts `concepts` (M',) against masks
        bool (B, K_gt, H, W), over every pair where a ground-truth concept is present. sources:
        int64 (B, M', K) indices into source_names of the candidates (same names every batch)."""
        if concepts.numel() and not (0 <= int(concepts.min()) and int(concepts.max()) < masks.shape[1]):
            raise ValueError(f"concept ids must lie in [0, {masks.shape[1]}); got {concepts.tolist()}")
        if maps.ndim not in (4, 5) or maps.shape[:2] != (masks.shape[0], concepts.numel()):
            raise ValueError(f"maps must have shape ({masks.shape[0]}, {concepts.numel()}, [K,] h, w); got {tuple(maps.shape)}")
        self._set_sources(tuple(source_names) if sources is not None else ())
        size = tuple(masks.shape[2:])
        area = masks.flatten(2).sum(dim=2)  # (B, K_gt)
        image, concept = ((area > 0) & (area < size[0] * size[1])).nonzero(as_tuple=True)
        if image.numel() == 0:
            return
        column = torch.full((masks.shape[1],), -1, dtype=torch.int64, device=masks.device)
        column[concepts.to(masks.device)] = torch.arange(concepts.numel(), device=masks.device)
        covered = column[concept] >= 0
        values = {key: torch.full((image.numel(),), math.nan, dtype=torch.float64, device=masks.device) for key in self.keys}
        if covered.any():
            b, j = image[covered], column[concept[covered]]
            truth = masks[b, concept[covered]]
            # select the scored pairs before resizing: M' may be thousands of concepts
            chosen = maps.to(masks.device)[b, j]  # (P, [K,] h, w)
            candidates = chosen if chosen.ndim == 4 else chosen[:, None]
            origin = None if sources is None else sources.to(masks.device)[b, j]  # (P, K)
            for protocol in self.protocols:
                scored = (self._paper if protocol == "paper" else self._authors)(candidates, truth)
                index = scored.pop("index")
                for key, value in scored.items():
                    values[key][covered] = value
                if origin is not None:
                    self._shares(values, covered, protocol, origin, index)
        for protocol in self.protocols:
            hit_key = "hit" if protocol == "paper" else "hit_authors"
            values[hit_key] = hit_with_coverage(values[hit_key], covered, self.hit_threshold)
        values["coverage"] = covered.to(torch.float64)
        for key in self.keys:
            self.rows[key].append(values[key].cpu())
        self.rows["concept"].append(concept.cpu())

    def _set_sources(self, names: tuple[str, ...]) -> None:
        if self.rows["concept"] and names != self.source_names:
            raise ValueError(f"candidate sources changed between batches: {self.source_names} then {names}")
        if names != self.source_names:
            self.source_names = names
            self.rows = {key: [] for key in (*self.keys, "concept")}

    def _paper(self, candidates: Tensor, truth: Tensor) -> dict[str, Tensor]:
        """Eq. 13 scores (the NRA values still to be turned into hits) of the best candidate."""
        fractions = self.fractions.to(truth.device)
        if candidates.shape[1] > 1:
            index = _best_candidates(candidates, truth, fractions)
        else:
            index = torch.zeros(len(truth), dtype=torch.int64, device=truth.device)
        selected = resize_maps(candidates[torch.arange(len(index), device=index.device), index], tuple(truth.shape[1:]))
        curves = iou_curve(selected, truth, fractions)
        self.curve.add(curves)
        value = nra_from_curves(curves, truth, fractions)
        auc, high, low = auc_from_curves(curves, truth, fractions)
        return {
            "nra": value, "nra_chance": nra_chance_from_curves(curves, truth, fractions), "epg": epg(selected, truth),
            "hit": value, "auc": auc, "auc_high": high, "auc_low": low, "index": index,
        }

    def _authors(self, candidates: Tensor, truth: Tensor) -> dict[str, Tensor]:
        """The authors' evaluate.py bookkeeping over the candidates (spatial.authors_best_candidate)."""
        p, k = candidates.shape[:2]
        resized = resize_maps(candidates.flatten(0, 1), tuple(truth.shape[1:]))
        repeated = truth.repeat_interleave(k, dim=0)
        auc, high, low = (part.view(p, k) for part in nra_authors_parts(resized, repeated))
        value = (auc - low).clamp(min=0) / (high - low)
        best, chosen_epg, index = authors_best_candidate(value, epg(resized, repeated).view(p, k))
        # the mask fixes AUC_high and AUC_low, so the best NRA is the best AUC (Table A4's AUC)
        return {
            "nra_authors": best, "epg_authors": chosen_epg, "hit_authors": best,
            "auc_authors": auc.amax(dim=1), "auc_high_authors": high[:, 0], "auc_low_authors": low[:, 0], "index": index,
        }

    def _shares(self, values: dict[str, Tensor], covered: Tensor, protocol: str, origin: Tensor, index: Tensor) -> None:
        """One-hot rows of the chosen candidate's source (NaN where none was chosen)."""
        source = origin.gather(1, index.clamp(min=0)[:, None])[:, 0]
        for position, name in enumerate(self.source_names):
            share = (source == position).to(torch.float64)
            values[SHARE_PREFIX[protocol] + name][covered] = torch.where(index >= 0, share, math.nan)

    @property
    def n_pairs(self) -> int:
        """Ground-truth pairs the method had a map for."""
        return int(sum(c.sum() for c in self.rows["coverage"]))

    def summary(self) -> dict[str, dict[str, float]]:
        """{"avg": {metric: value}, TYPE: {...}}: means per concept type, then over types."""
        if not self.n_pairs:
            return {}
        types = [self.concept_types[k] for k in torch.cat(self.rows["concept"]).tolist()]
        return summarise_by_type({key: torch.cat(self.rows[key]) for key in self.keys}, types)


def _best_candidates(candidates: Tensor, truth: Tensor, fractions: Tensor) -> Tensor:
    """Index (P,) of the candidate map of best NRA among (P, K, h, w), against masks (P, H, W).

    Both NRAs rise with the map's IoU AUC, so either picks the same candidate; unclamped CE-FAM
    NRA keeps candidates below its lower curve apart.
    """
    p, k = candidates.shape[:2]
    resized = resize_maps(candidates.flatten(0, 1), tuple(truth.shape[1:]))
    repeated = truth.repeat_interleave(k, dim=0)
    scores = nra_from_curves(iou_curve(resized, repeated, fractions), repeated, fractions, clamp=False).view(p, k)
    *_, index = best_candidate(scores)
    return index


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

