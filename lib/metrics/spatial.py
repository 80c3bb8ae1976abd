"""Concept-region metrics of CE-FAM (App. A.3): NRA, EPG and Hit Rate, batched over maps.

Every function takes a batch of B maps (one per (image, concept) pair) with their ground-truth
masks and works on the tensors' device. Scores are float64 (B,) tensors; NaN marks a score that
is undefined for that row (see each function), and `summarise_by_type` ignores NaNs.

Top-n% selection and ties. CE-FAM thresholds the map at T_n so that the top n% pixels are
selected (IoU_n = |R >= T_n ∩ M| / |R >= T_n ∪ M|). Read literally, a map with ties at T_n
selects the whole tied run, so a constant map would select every pixel at every n and score far
above chance. Here exactly k = n·N pixels are selected, and a run of tied values that straddles
the cut contributes its mask pixels pro rata (the expected intersection under uniformly random
tie-breaking). Consequences: the result does not depend on sort order (deterministic on any
device), a constant or all-zero map scores exactly the random curve (NRA 0), a map equal to the
mask scores exactly the ideal curve (NRA 1), and fractional k interpolates linearly, so the
curves do not depend on the map resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# CE-FAM plots IoU against n = 0 … 100 % without giving the step; 1 % steps on the closed range.
DEFAULT_STEPS = 101


def default_fractions(device: torch.device | str = "cpu") -> Tensor:
    """The default top-n fractions 0, 0.01, …, 1 (float64, (101,))."""
    return torch.linspace(0.0, 1.0, DEFAULT_STEPS, dtype=torch.float64, device=device)


def check_maps_masks(maps: Tensor, masks: Tensor) -> None:
    """Raise ValueError unless maps is a finite float (B, H, W) tensor and masks a bool tensor
    of the same shape on the same device."""
    if maps.ndim != 3 or not maps.is_floating_point():
        raise ValueError(f"maps must be a float tensor (B, H, W); got {maps.dtype} {tuple(maps.shape)}")
    if masks.dtype != torch.bool or masks.shape != maps.shape:
        raise ValueError(
            f"masks must be a bool tensor shaped like maps {tuple(maps.shape)}; got {masks.dtype} {tuple(masks.shape)}"
        )
    if masks.device != maps.device:
        raise ValueError(f"masks is on {masks.device} but maps is on {maps.device}; put both on one device")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contains NaN or infinite values; only finite values are allowed")


def _check_masks(masks: Tensor) -> None:
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor (B, H, W); got {masks.dtype} {tuple(masks.shape)}")


def _as_fractions(fractions: Tensor, device: torch.device) -> Tensor:
    """Validate top-n fractions and return them as float64 on `device`."""
    fractions = torch.as_tensor(fractions, dtype=torch.float64, device=device)
    if fractions.ndim != 1 or fractions.numel() < 2:
        raise ValueError(f"fractions must be 1-D with at least 2 values; got shape {tuple(fractions.shape)}")
    if not ((fractions >= 0) & (fractions <= 1)).all() or not (fractions.diff() > 0).all():
        raise ValueError(f"fractions must be strictly increasing values in [0, 1]; got {fractions.tolist()}")
    return fractions


def tie_groups(sorted_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Runs of equal values in each row of a sorted (B, N) tensor.

    Returns `(start, end)`, both int64 (B, N): element j of a row lies in the run occupying
    positions [start[j], end[j]) of that row.
    """
    b, n = sorted_rows.shape
    positions = torch.arange(n, device=sorted_rows.device).expand(b, n)
    opens = torch.ones_like(sorted_rows, dtype=torch.bool)
    opens[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    closes = torch.ones_like(opens)
    closes[:, :-1] = opens[:, 1:]
    start = torch.where(opens, positions, 0).cummax(dim=1).values
    # the next run's opening, scanned from the right, is this run's end
    end = torch.where(closes, positions + 1, n).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def iou_curve(maps: Tensor, masks: Tensor, fractions: Tensor) -> Tensor:
    """IoU_n of the top-n fraction of each map's pixels with its mask.

    maps: float (B, H, W); masks: bool (B, H, W); fractions: (T,) strictly increasing in [0, 1].
    Returns float64 (B, T). Ties are split pro rata (module docstring). IoU at n = 0 with an
    empty mask is 0/0 = NaN.
    """
    check_maps_masks(maps, masks)
    fractions = _as_fractions(fractions, maps.device)
    b = maps.shape[0]
    values, order = maps.flatten(1).sort(dim=1, descending=True)
    n = values.shape[1]
    # hits[:, j] = mask pixels among the j highest-valued pixels
    hits = torch.zeros(b, n + 1, dtype=torch.int64, device=maps.device)
    hits[:, 1:] = masks.flatten(1).gather(1, order).cumsum(dim=1)
    start, end = tie_groups(values)

    k = (fractions * n).expand(b, -1)
    run = k.floor().long().clamp(max=n - 1)
    s, e = start.gather(1, run), end.gather(1, run)
    hits_s, hits_e = hits.gather(1, s), hits.gather(1, e)
    inter = hits_s + (k - s) * (hits_e - hits_s) / (e - s)
    area = hits[:, -1:]
    return inter / (k + area - inter)


def random_iou_curve(masks: Tensor, fractions: Tensor) -> Tensor:
    """IoU of a uniformly random selection of the top-n fraction: the lower reference curve.

    Uses the expected intersection k·m/N (ratio of expectations, exact for a constant map under
    this module's tie rule; it differs from E[IoU] by O(1/N)). Returns float64 (B, T).
    """
    _check_masks(masks)
    fractions = _as_fractions(fractions, masks.device)
    n = masks.shape[1] * masks.shape[2]
    area = masks.sum(dim=(1, 2), dtype=torch.float64)[:, None]
    k = fractions * n
    inter = k * area / n
    return inter / (k + area - inter)


def ideal_iou_curve(masks: Tensor, fractions: Tensor) -> Tensor:
    """IoU of the best possible top-n selection, min(k, m)/max(k, m): the upper reference curve.

    Returns float64 (B, T).
    """
    _check_masks(masks)
    fractions = _as_fractions(fractions, masks.device)
    area = masks.sum(dim=(1, 2), dtype=torch.float64)[:, None]
    k = fractions * masks.shape[1] * masks.shape[2]
    return torch.minimum(k, area) / torch.maximum(k, area)


def _auc(curves: Tensor, fractions: Tensor) -> Tensor:
    """Trapezoid area under (B, T) curves, divided by the fraction range so it lies in [0, 1]."""
    return torch.trapezoid(curves, x=fractions, dim=-1) / (fractions[-1] - fractions[0])


def nra(maps: Tensor, masks: Tensor, fractions: Tensor | None = None) -> Tensor:
    """Normalized Region Accuracy (CE-FAM eq. 13): (AUC − AUC_low) / (AUC_high − AUC_low).

    maps: float (B, H, W); masks: bool (B, H, W); fractions default `default_fractions()`.
    Returns float64 (B,). 1 for a map ranking the mask first, 0 for a constant map, ≈ 0 on
    average for random maps, negative below chance. NaN where the mask is empty or covers the
    whole map: there the ideal and random curves coincide and no map can be told apart.
    """
    fractions = _as_fractions(default_fractions() if fractions is None else fractions, maps.device)
    return nra_from_curves(iou_curve(maps, masks, fractions), masks, fractions)


def nra_from_curves(curves: Tensor, masks: Tensor, fractions: Tensor) -> Tensor:
    """NRA of precomputed `iou_curve(maps, masks, fractions)` rows (B, T), for callers that
    also keep the curves (sorting the maps is the expensive part). Same result as `nra`."""
    _check_masks(masks)
    fractions = _as_fractions(fractions, masks.device)
    if curves.shape != (masks.shape[0], fractions.numel()):
        raise ValueError(
            f"curves must have shape ({masks.shape[0]}, {fractions.numel()}) (masks, fractions); got {tuple(curves.shape)}"
        )
    auc = _auc(curves, fractions)
    low = _auc(random_iou_curve(masks, fractions), fractions)
    high = _auc(ideal_iou_curve(masks, fractions), fractions)
    area = masks.sum(dim=(1, 2))
    defined = (area > 0) & (area < masks.shape[1] * masks.shape[2])
    return torch.where(defined, (auc - low) / (high - low), math.nan)


def epg(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based Pointing Game (CE-FAM eq. A2): share of the map's energy inside the mask.

    The map is clipped at 0 first: energy is positive evidence, and negative values would let
    the ratio leave [0, 1]. Pass maps as the method defines them (CE-FAM regions are already
    ReLU'd); EPG is not shift-invariant. Returns float64 (B,); NaN where the clipped map is all
    zero (no energy to point with) or the mask is empty (nothing to point at).
    """
    check_maps_masks(maps, masks)
    energy = maps.clamp(min=0)
    # float64 sums: fp16 maps from the stores would overflow and lose the small pixels
    inside = torch.where(masks, energy, 0).sum(dim=(1, 2), dtype=torch.float64)
    total = energy.sum(dim=(1, 2), dtype=torch.float64)
    defined = (total > 0) & masks.any(dim=(1, 2))
    return torch.where(defined, inside / total, math.nan)


def hit(nra_values: Tensor, threshold: float = 0.5) -> Tensor:
    """Hit indicator of CE-FAM (NRA exceeds `threshold`), as float64 (B,): 1.0, 0.0, or NaN
    where the NRA is NaN, so the Hit Rate is averaged over the same rows as the NRA.
    """
    if nra_values.ndim != 1:
        raise ValueError(f"nra_values must be 1-D (B,); got shape {tuple(nra_values.shape)}")
    hits = (nra_values > threshold).to(torch.float64)
    return torch.where(nra_values.isnan(), math.nan, hits)


AVERAGE_KEY = "avg"


def summarise_by_type(values: Mapping[str, Tensor], concept_types: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean of each metric per concept type, then the mean of those means ("avg", CE-FAM Table 1).

    values: metric name -> (B,) tensor, row i belonging to concept type `concept_types[i]`.
    NaNs are ignored at both levels; a type with no defined value gets NaN for that metric.
    Returns {"avg": {metric: float}, TYPE: {metric: float}, ...} with types in sorted order.
    """
    if not values:
        raise ValueError("values is empty; pass at least one metric name -> (B,) tensor")
    types = sorted(set(concept_types))
    if AVERAGE_KEY in types:
        raise ValueError(f"concept_types contains the reserved name {AVERAGE_KEY!r}; rename that type")
    column = {name: i for i, name in enumerate(types)}
    group = torch.tensor([column[t] for t in concept_types])
    out: dict[str, dict[str, float]] = {AVERAGE_KEY: {}} | {t: {} for t in types}
    for metric, v in values.items():
        if v.ndim != 1 or v.numel() != len(concept_types):
            raise ValueError(
                f"values[{metric!r}] must have shape ({len(concept_types)},) to match concept_types; "
                f"got {tuple(v.shape)}"
            )
        v = v.to(torch.float64)
        defined = ~v.isnan()
        sums = v.new_zeros(len(types)).index_add_(0, group.to(v.device), torch.where(defined, v, 0.0))
        counts = v.new_zeros(len(types)).index_add_(0, group.to(v.device), defined.to(torch.float64))
        per_type = sums / counts  # 0/0 -> NaN for a type without defined values
        out[AVERAGE_KEY][metric] = per_type.nanmean().item()
        for t, mean in zip(types, per_type.tolist(), strict=True):
            out[t][metric] = mean
    return out
