"""Concept-region metrics of CE-FAM (§4.3, App. A.3, and the authors' evaluate.py): NRA, EPG and
Hit Rate, batched over maps.

Every function takes a batch of B maps (one per (image, concept) pair) with their ground-truth
masks and works on the tensors' device. Scores are float64 (B,) tensors; NaN marks a score that
is undefined for that row (see each function), and `summarise_by_type` ignores NaNs.

NRA = (AUC - AUC_low) / (AUC_high - AUC_low), AUC the area under IoU_n of the top-n fraction of
the map's pixels with the mask, n in [0, 1]; AUC_high that of the ideal curve min(n, a)/max(n, a)
(a = the mask's share of the image). Two lower curves:

* `nra` — CE-FAM's: IoU_low(n) = a*n, so AUC_low = a/2 (the authors' `nra_eval`), and negative
  values are clipped to 0 as there. a*n lies below the IoU a random selection gets, so random
  and constant maps score above 0 (about 0.1-0.3): only Hit (NRA > 0.5) is free of that offset.
* `nra_chance` — ours: the IoU a uniformly random selection gets on average (`random_iou_curve`),
  so a random or constant map scores 0 and below-chance maps are negative.

The n grid (`cefam_fractions`): 1 % steps cannot resolve a mask smaller than 1 % of the image
(the ideal curve peaks at n = a, between two grid points, and a map that ranks every mask pixel
late can tie the ideal curve at every grid point). Like the authors' code, the grid steps pixel
by pixel through the first 1 % and by 1 % after it, so a step is never coarser than the mask.
Areas are trapezoids over that grid (the authors add 1/N-weighted fine points *and* 1/100-weighted
coarse points, which counts the first 1 % twice; see `nra`).

EPG (`epg`): each map is min-max rescaled to [0, 1] first (the authors' `epg_eval`), then the
share of its sum inside the mask; a constant map (all-zero included) scores 0. `epg_raw` is the
unnormalised energy share (clipped at 0).

Two protocols (the evaluate stage's `evaluate.protocol`):

* paper — eq. 13 as written, on the grid above with the pro-rata tie rule below: `nra`, `epg`,
  `hit`; the chosen candidate's EPG is kept whatever its NRA (`best_candidate`);
* authors — the bookkeeping of the authors' evaluate.py: `nra_authors` (their nra_eval loop:
  descending order of np.argsort(kind="stable")[::-1] — ties in descending pixel index —,
  fine points weighted 1/N and bin points 1/100, the ideal curve one pixel behind) and
  `authors_best_candidate` (the first candidate whose NRA beats the running best, starting from
  0; EPG and NRA stay 0 when no candidate's NRA exceeds 0).

Hit = NRA > 0.5 over all ground-truth (image, concept) pairs; a pair whose concept has no map is a
miss (`hit_with_coverage`), while NRA and EPG average over the pairs that have a map (the
authors' eval_logs: hit_count / total_count, score sums / valid_count).

Top-n selection and ties. CE-FAM thresholds the map at T_n so that the top n% pixels are
selected (IoU_n = |R >= T_n ∩ M| / |R >= T_n ∪ M|). Read literally, a map with ties at T_n
selects the whole tied run, so a constant map would select every pixel at every n and score far
above chance; the authors' code instead takes np.argsort's arbitrary order within ties. Here
exactly k = n·N pixels are selected, and a run of tied values that straddles the cut contributes
its mask pixels pro rata (the expected intersection under uniformly random tie-breaking).
Consequences: the result does not depend on sort order (deterministic on any device), a constant
or all-zero map scores exactly the chance curve, a map equal to the mask scores exactly the ideal
curve (NRA 1), and fractional k interpolates linearly, so the curves do not depend on the map
resolution for a fixed grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# CE-FAM plots IoU against n = 0 … 100 % in 1 % steps (evaluate.py: bin_num = 100)
DEFAULT_STEPS = 101
DEFAULT_BINS = 100


def default_fractions(device: torch.device | str = "cpu") -> Tensor:
    """The plain top-n fractions 0, 0.01, …, 1 (float64, (101,)); see `cefam_fractions`."""
    return torch.linspace(0.0, 1.0, DEFAULT_STEPS, dtype=torch.float64, device=device)


def cefam_fractions(n_pixels: int, bins: int = DEFAULT_BINS, device: torch.device | str = "cpu") -> Tensor:
    """CE-FAM's top-n grid for maps of `n_pixels` pixels (float64, sorted, from 0 to 1).

    Every whole pixel count k = 0 … N // bins (k/N), then the bin edges 1/bins, 2/bins, …, 1:
    pixel steps through the first bin, where a bin would be coarser than a small mask, as in the
    authors' nra_eval (`idx < step` with step = N // 100). A mask larger than one bin is resolved
    by the bins. For N < bins the bins are finer than a pixel already.
    """
    if n_pixels < 1 or bins < 1:
        raise ValueError(f"n_pixels and bins must be >= 1; got {n_pixels}, {bins}")
    fine = torch.arange(n_pixels // bins + 1, dtype=torch.float64) / n_pixels
    coarse = torch.arange(1, bins + 1, dtype=torch.float64) / bins
    # k/N and j/bins are correctly rounded quotients: equal values are equal doubles, so unique merges them
    return torch.unique(torch.cat([fine, coarse])).to(device)


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


def cefam_lower_iou_curve(masks: Tensor, fractions: Tensor) -> Tensor:
    """CE-FAM's lower reference curve IoU_low(n) = a·n, a the mask's share of the image.

    Its area over [0, 1] is a/2 (the authors' `lower_auc = mask_ratio / 2`). It lies below the
    chance curve `random_iou_curve` (a·n/(n + a − a·n)), touching it only at n = 0 and 1.
    Returns float64 (B, T).
    """
    _check_masks(masks)
    fractions = _as_fractions(fractions, masks.device)
    share = masks.sum(dim=(1, 2), dtype=torch.float64)[:, None] / (masks.shape[1] * masks.shape[2])
    return share * fractions


def _auc(curves: Tensor, fractions: Tensor) -> Tensor:
    """Trapezoid area under (B, T) curves, divided by the fraction range so it lies in [0, 1]."""
    return torch.trapezoid(curves, x=fractions, dim=-1) / (fractions[-1] - fractions[0])


def _grid(maps: Tensor, fractions: Tensor | None) -> Tensor:
    if fractions is None:
        return cefam_fractions(maps.shape[-2] * maps.shape[-1], device=maps.device)
    return _as_fractions(fractions, maps.device)


def nra(maps: Tensor, masks: Tensor, fractions: Tensor | None = None, clamp: bool = True) -> Tensor:
    """Normalized Region Accuracy as CE-FAM defines it (eq. 13, App. A.3, evaluate.py nra_eval).

    (AUC − a/2) / (AUC_high − a/2), the lower curve a·n (`cefam_lower_iou_curve`), clipped at 0
    like the authors' max(AUC − AUC_low, 0) unless clamp=False. maps: float (B, H, W); masks:
    bool (B, H, W); fractions default `cefam_fractions(H·W)`. Returns float64 (B,): 1 for a map
    that ranks the mask first; a constant or random map scores above 0 (module docstring). NaN
    where the mask is empty or covers the whole map (no map can be told apart there).

    Differences from the authors' loop, which sums IoU at pixel counts idx + 1 with weight 1/N for
    idx < N // 100 and with weight 1/100 at every multiple of N // 100: that counts the first 1 %
    twice (once per pixel, once as the first bin), its ideal curve uses idx instead of idx + 1
    pixels, and its bins are N // 100 pixels wide but weighted 1/100. Here both curves are
    trapezoids over one grid. On a 64×64 image with a 20-pixel mask ranked right after 20 wrong
    pixels: 0.8253 here, 0.8228 in the continuum, 0.8404 by the authors' loop, 1.0 on 1 % steps.
    """
    fractions = _grid(maps, fractions)
    return nra_from_curves(iou_curve(maps, masks, fractions), masks, fractions, clamp=clamp)


def nra_chance(maps: Tensor, masks: Tensor, fractions: Tensor | None = None) -> Tensor:
    """NRA with the chance curve as the lower reference (`random_iou_curve`): 0 for a constant
    map and ≈ 0 on average for random maps, negative below chance. Same grid default and NaN
    rows as `nra`. Returns float64 (B,)."""
    fractions = _grid(maps, fractions)
    return nra_chance_from_curves(iou_curve(maps, masks, fractions), masks, fractions)


def _normalised_auc(curves: Tensor, masks: Tensor, fractions: Tensor, low_curve: Tensor) -> Tensor:
    _check_masks(masks)
    fractions = _as_fractions(fractions, masks.device)
    if curves.shape != (masks.shape[0], fractions.numel()):
        raise ValueError(
            f"curves must have shape ({masks.shape[0]}, {fractions.numel()}) (masks, fractions); got {tuple(curves.shape)}"
        )
    auc = _auc(curves, fractions)
    low = _auc(low_curve, fractions)
    high = _auc(ideal_iou_curve(masks, fractions), fractions)
    area = masks.sum(dim=(1, 2))
    defined = (area > 0) & (area < masks.shape[1] * masks.shape[2])
    return torch.where(defined, (auc - low) / (high - low), math.nan)


def nra_from_curves(curves: Tensor, masks: Tensor, fractions: Tensor, clamp: bool = True) -> Tensor:
    """CE-FAM's NRA (`nra`) of precomputed `iou_curve(maps, masks, fractions)` rows (B, T), for
    callers that also keep the curves (sorting the maps is the expensive part)."""
    fractions = _as_fractions(fractions, masks.device)
    value = _normalised_auc(curves, masks, fractions, cefam_lower_iou_curve(masks, fractions))
    return value.clamp(min=0) if clamp else value  # clamp keeps NaN


def auc_from_curves(curves: Tensor, masks: Tensor, fractions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The unnormalised areas behind `nra_from_curves` (CE-FAM Table A4): (AUC, AUC_high, AUC_low),
    each float64 (B,), AUC_low = a/2 of CE-FAM's lower curve; NaN where NRA is undefined."""
    _check_masks(masks)
    fractions = _as_fractions(fractions, masks.device)
    area = masks.sum(dim=(1, 2))
    defined = (area > 0) & (area < masks.shape[1] * masks.shape[2])
    parts = (curves, ideal_iou_curve(masks, fractions), cefam_lower_iou_curve(masks, fractions))
    return tuple(torch.where(defined, _auc(c, fractions), math.nan) for c in parts)


def nra_authors_parts(maps: Tensor, masks: Tensor, bins: int = DEFAULT_BINS) -> tuple[Tensor, Tensor, Tensor]:
    """(AUC, AUC_high, AUC_low), float64 (B,), as the authors' nra_eval accumulates them.

    Pixels in descending order, ties in descending flat index (np.argsort(kind="stable")[::-1];
    the authors' default quicksort leaves tie order to the CPU's sort kernel). After pixel idx
    (0-based, so idx + 1 pixels selected) with step = N // bins: at idx < step and at every
    multiple of step, IoU = tp / (fp + m) is added with weight 1/N (idx < step) or 1/bins, and
    the ideal idx/m (idx < m) or m/idx likewise; AUC_low = (m/N)/2. NaN where the mask is empty
    or the whole map. Maps of fewer than `bins` pixels (where the authors' loop divides by
    step = 0) count every pixel with weight 1/N (bins = N).
    """
    check_maps_masks(maps, masks)
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    n = maps.shape[1] * maps.shape[2]
    bins = min(bins, n)
    step = n // bins
    idx = torch.arange(n, device=maps.device)
    counted = idx[(idx < step) | (idx % step == 0)]  # the loop's scoring points
    weight = torch.full(counted.shape, 1.0 / bins, dtype=torch.float64, device=maps.device)
    weight[counted < step] = 1.0 / n
    order = maps.flatten(1).sort(dim=1, stable=True).indices.flip(1)
    tp = masks.flatten(1).gather(1, order).cumsum(dim=1, dtype=torch.float64)[:, counted]  # after pixel idx
    area = masks.sum(dim=(1, 2), dtype=torch.float64)[:, None]
    selected = (counted + 1).to(torch.float64)
    seg = tp / (selected - tp + area)
    point = counted.to(torch.float64)
    upper = torch.where(point < area, point / area, area / point.clamp_min(1))  # point 0 only when area > 0 here
    defined = (area[:, 0] > 0) & (area[:, 0] < n)
    parts = ((seg * weight).sum(dim=1), (upper * weight).sum(dim=1), area[:, 0] / n / 2)
    return tuple(torch.where(defined, part, math.nan) for part in parts)


def nra_authors(maps: Tensor, masks: Tensor, bins: int = DEFAULT_BINS) -> Tensor:
    """NRA as the authors' evaluate.py computes it: max(AUC − AUC_low, 0) / (AUC_high − AUC_low)
    of `nra_authors_parts`. float64 (B,), NaN where the mask is empty or the whole map. A map
    equal to the mask scores near 1, not 1 (the ideal curve is taken at idx pixels, the map's
    IoU at idx + 1): 0.9973 for 20 pixels of 64×64, 1.0113 for 16 of 8×8."""
    auc, high, low = nra_authors_parts(maps, masks, bins)
    return (auc - low).clamp(min=0) / (high - low)


def authors_best_candidate(nra_values: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """The authors' choice among candidate maps (evaluate.py): scanning candidates in order, the
    first whose NRA beats the running best, which starts at 0. nra_values, others: (B, C).
    Returns (NRA (B,), each of `others` at the choice, index (B,)); where no candidate's NRA
    exceeds 0 nothing is chosen: NRA and the others are 0 and the index is -1 (their EPG = 0).
    NaN candidates are never chosen."""
    if nra_values.ndim != 2 or any(o.shape != nra_values.shape for o in others):
        raise ValueError(
            f"nra_values and others must share one (B, C) shape; got {tuple(nra_values.shape)}, {[tuple(o.shape) for o in others]}"
        )
    values = nra_values.nan_to_num(nan=-math.inf)
    best, index = values.max(dim=1)  # max returns the first of equal maxima: the scan's strict ">"
    chosen = best > 0
    index = torch.where(chosen, index, -1)
    picked = [torch.where(chosen, t.gather(1, index.clamp(min=0)[:, None])[:, 0], 0.0) for t in (nra_values, *others)]
    return (*picked, index)


def nra_chance_from_curves(curves: Tensor, masks: Tensor, fractions: Tensor) -> Tensor:
    """`nra_chance` of precomputed `iou_curve(maps, masks, fractions)` rows (B, T)."""
    return _normalised_auc(curves, masks, fractions, random_iou_curve(masks, fractions))


def epg(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based Pointing Game as CE-FAM computes it (eq. A2, evaluate.py epg_eval).

    Each map is min-max rescaled to [0, 1] first, then EPG = its sum inside the mask / its total
    sum. The rescaling makes EPG invariant to a map's offset and scale (raw maps with a positive
    floor would otherwise score near the mask share). A constant map (all-zero included) has
    nothing to point with and scores 0, kept in averages (the authors return 0.0 for an all-zero
    map). Returns float64 (B,); NaN only where the mask is empty (nothing to point at).
    """
    check_maps_masks(maps, masks)
    # float64: fp16 maps from the stores would overflow in the sums and lose the small pixels
    values = maps.to(torch.float64)
    low = values.amin(dim=(1, 2), keepdim=True)
    span = values.amax(dim=(1, 2), keepdim=True) - low
    scaled = torch.where(span > 0, (values - low) / span.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    inside = torch.where(masks, scaled, 0).sum(dim=(1, 2))
    total = scaled.sum(dim=(1, 2))
    score = torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return torch.where(masks.any(dim=(1, 2)), score, math.nan)


def epg_raw(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy share inside the mask of the maps as given (no rescaling), clipped at 0.

    Energy is positive evidence, and negative values would let the ratio leave [0, 1]. Not
    shift-invariant: pass maps as the method defines them. Returns float64 (B,); NaN where the
    clipped map is all zero (no energy to point with) or the mask is empty (nothing to point at).
    """
    check_maps_masks(maps, masks)
    energy = maps.clamp(min=0)
    inside = torch.where(masks, energy, 0).sum(dim=(1, 2), dtype=torch.float64)
    total = energy.sum(dim=(1, 2), dtype=torch.float64)
    defined = (total > 0) & masks.any(dim=(1, 2))
    return torch.where(defined, inside / total, math.nan)


def hit(nra_values: Tensor, threshold: float = 0.5) -> Tensor:
    """Hit indicator of CE-FAM (NRA exceeds `threshold`), as float64 (B,): 1.0, 0.0, or NaN
    where the NRA is NaN, so the Hit Rate is averaged over the same rows as the NRA. For rows
    whose concept has no map use `hit_with_coverage`.
    """
    if nra_values.ndim != 1:
        raise ValueError(f"nra_values must be 1-D (B,); got shape {tuple(nra_values.shape)}")
    hits = (nra_values > threshold).to(torch.float64)
    return torch.where(nra_values.isnan(), math.nan, hits)


def hit_with_coverage(nra_values: Tensor, covered: Tensor, threshold: float = 0.5) -> Tensor:
    """Hit indicator over all ground-truth pairs: a pair whose concept has no map is a miss.

    nra_values: (B,) NRA of each (image, concept) pair (any value, NaN included, where not
    covered); covered: bool (B,), True where the method gave that concept a map. Returns float64
    (B,): 0.0 where not covered, else `hit` (NaN for an undefined NRA). Averaged per concept type
    next to NRA and EPG set to NaN on the uncovered rows, this is CE-FAM's Table 1 bookkeeping:
    Hit Rate over all pairs, NRA and EPG over the pairs with a map.
    """
    if covered.dtype != torch.bool or covered.shape != nra_values.shape:
        raise ValueError(
            f"covered must be a bool tensor shaped like nra_values {tuple(nra_values.shape)}; got {covered.dtype} {tuple(covered.shape)}"
        )
    return torch.where(covered.to(nra_values.device), hit(nra_values, threshold), 0.0)


def hit_rate(nra_values: Tensor, covered: Tensor | None = None, threshold: float = 0.5) -> float:
    """Share of pairs with NRA > threshold, uncovered pairs counting as misses and undefined
    (NaN) NRAs left out: the plain mean of `hit_with_coverage` (NaN if no pair is defined)."""
    covered = torch.ones_like(nra_values, dtype=torch.bool) if covered is None else covered
    return hit_with_coverage(nra_values, covered, threshold).nanmean().item()


def best_candidate(nra_values: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Best of several candidate maps per pair by NRA (CE-FAM Table 1: the best of the top-4
    layers by association score). nra_values: (B, C); others: (B, C) scores of the same
    candidates (e.g. EPG). Returns (best NRA (B,), each of `others` at that candidate, index (B,)).
    NaN candidates are never chosen unless all are NaN. (The authors keep EPG = 0 when no
    candidate's NRA exceeds 0; here EPG is the chosen candidate's.)
    """
    if nra_values.ndim != 2 or any(o.shape != nra_values.shape for o in others):
        raise ValueError(
            f"nra_values and others must share one (B, C) shape; got {tuple(nra_values.shape)}, {[tuple(o.shape) for o in others]}"
        )
    index = nra_values.nan_to_num(nan=-math.inf).argmax(dim=1)
    picked = [t.gather(1, index[:, None])[:, 0] for t in (nra_values, *others)]
    return (*picked, index)


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
            raise ValueError(f"values[{metric!r}] must have shape ({len(concept_types)},) to match concept_types; got {tuple(v.shape)}")
        v = v.to(torch.float64)
        defined = ~v.isnan()
        sums = v.new_zeros(len(types)).index_add_(0, group.to(v.device), torch.where(defined, v, 0.0))
        counts = v.new_zeros(len(types)).index_add_(0, group.to(v.device), defined.to(torch.float64))
        per_type = sums / counts  # 0/0 -> NaN for a type without defined values
        out[AVERAGE_KEY][metric] = per_type.nanmean().item()
        for t, mean in zip(types, per_type.tolist(), strict=True):
            out[t][metric] = mean
    return out
