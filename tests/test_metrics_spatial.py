"""NRA, EPG, Hit Rate and the per-type summary: hand-computed answers, references, invariants."""

import math

import pytest
import torch
from sklearn.metrics import jaccard_score
from torchmetrics.classification import BinaryJaccardIndex

from lib.metrics.spatial import (
    auc_from_curves,
    authors_best_candidate,
    best_candidate,
    cefam_fractions,
    cefam_lower_iou_curve,
    default_fractions,
    epg,
    epg_raw,
    hit,
    hit_rate,
    hit_with_coverage,
    ideal_iou_curve,
    iou_curve,
    nra,
    nra_authors,
    nra_authors_parts,
    nra_chance,
    nra_chance_from_curves,
    nra_from_curves,
    random_iou_curve,
    summarise_by_type,
    tie_groups,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_maps(shape, seed: int) -> torch.Tensor:
    """Uniform [0, 1) float32 maps from a seeded CPU generator (kept here so this test does not
    depend on where the project's baselines live)."""
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed))


def _square_mask(batch: int = 1, size: int = 4, side: int = 2) -> torch.Tensor:
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    mask[:, :side, :side] = True
    return mask


def _ranked_map(order: list[int], size: int = 4) -> torch.Tensor:
    """A (1, size, size) map whose flat pixel order[0] is highest, order[1] next, and so on."""
    values = torch.zeros(size * size)
    values[torch.tensor(order)] = torch.arange(len(order), 0, -1, dtype=torch.float32)
    return values.reshape(1, size, size)


def test_tie_groups_marks_runs():
    start, end = tie_groups(torch.tensor([[5.0, 5.0, 3.0, 2.0, 2.0, 2.0]]))
    assert start.tolist() == [[0, 0, 2, 3, 3, 3]]
    assert end.tolist() == [[2, 2, 3, 6, 6, 6]]


@pytest.mark.parametrize("device", DEVICES)
def test_iou_curve_hand_computed(device):
    # mask = flat pixels {0, 1, 4, 5}; ranking: 0 (in), 2 (out), 1 (in), 4 (in), 5 (in), rest
    maps = _ranked_map([0, 2, 1, 4, 5]).to(device)
    masks = _square_mask().to(device)
    fractions = torch.tensor([0, 1, 1.5, 2, 4, 5, 8, 16]) / 16
    # k=1: I=1,U=4; k=1.5: I=1,U=4.5; k=2: I=1,U=5; k=4: I=3,U=5; k=5: 4/5; k=8: 4/8; k=16: 4/16
    expected = [0, 1 / 4, 1 / 4.5, 1 / 5, 3 / 5, 4 / 5, 4 / 8, 4 / 16]
    curve = iou_curve(maps, masks, fractions)
    assert curve.dtype == torch.float64 and curve.device.type == device
    torch.testing.assert_close(curve.cpu(), torch.tensor([expected], dtype=torch.float64))


def test_iou_curve_splits_a_straddling_tie_pro_rata():
    # top run: 8 tied pixels holding 3 of the 4 mask pixels; the other 8 pixels are 0
    maps = torch.zeros(1, 4, 4)
    maps.view(-1)[torch.tensor([0, 1, 4, 2, 3, 6, 7, 8])] = 1.0
    curve = iou_curve(maps, _square_mask(), torch.tensor([0.25, 0.5, 1.0]))
    # k=4 takes half the run: I = 1.5, U = 4 + 4 - 1.5; k=8: I = 3, U = 9; k=16: 4/16
    torch.testing.assert_close(curve, torch.tensor([[1.5 / 6.5, 3 / 9, 4 / 16]], dtype=torch.float64))


def test_iou_curve_matches_sklearn_and_torchmetrics_at_whole_pixel_counts():
    maps = random_maps((6, 8, 8), seed=1)
    masks = random_maps((6, 8, 8), seed=2) > 0.7
    ks = [1, 5, 13, 32, 50, 64]
    curve = iou_curve(maps, masks, torch.tensor(ks) / 64)
    jaccard = BinaryJaccardIndex()
    for i in range(6):
        for j, k in enumerate(ks):
            selected = maps[i] >= maps[i].flatten().topk(k).values[-1]
            expected = jaccard_score(masks[i].flatten().numpy(), selected.flatten().numpy())
            assert curve[i, j].item() == pytest.approx(expected, abs=1e-12)
            assert curve[i, j].item() == pytest.approx(jaccard(selected, masks[i]).item(), abs=1e-6)


def test_ties_equal_the_mean_intersection_under_random_tie_breaking():
    maps = (random_maps((1, 6, 6), seed=3) * 3).floor()  # three values: long tied runs
    masks = random_maps((1, 6, 6), seed=4) > 0.6
    ks = torch.tensor([3, 10, 20, 30])
    # break ties with tiny noise many times; average the intersection at each k
    jittered = maps + 1e-3 * random_maps((4000, 6, 6), seed=5)
    order = jittered.flatten(1).argsort(dim=1, descending=True)
    inside = masks.flatten(1).expand(4000, -1).gather(1, order).cumsum(dim=1).double()
    mean_inter = inside[:, ks - 1].mean(dim=0)
    expected = mean_inter / (ks + masks.sum() - mean_inter)
    torch.testing.assert_close(iou_curve(maps, masks, ks / 36)[0], expected, atol=0.01, rtol=0)


def test_curves_do_not_depend_on_resolution():
    maps = (random_maps((3, 5, 5), seed=6) * 4).floor()
    masks = random_maps((3, 5, 5), seed=7) > 0.5
    fractions = default_fractions()

    def up(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(3, dim=1).repeat_interleave(3, dim=2)

    torch.testing.assert_close(iou_curve(up(maps), up(masks), fractions), iou_curve(maps, masks, fractions))
    # on a fixed grid; the default CE-FAM grid follows the pixel count on purpose
    torch.testing.assert_close(nra_chance(up(maps), up(masks), fractions), nra_chance(maps, masks, fractions))
    torch.testing.assert_close(nra(up(maps), up(masks), fractions), nra(maps, masks, fractions))


def test_iou_curve_ignores_pixel_order():
    maps = (random_maps((4, 6, 6), seed=8) * 3).floor()
    masks = random_maps((4, 6, 6), seed=9) > 0.5
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(0))
    shuffled_maps = maps.flatten(1)[:, perm].reshape(4, 6, 6)
    shuffled_masks = masks.flatten(1)[:, perm].reshape(4, 6, 6)
    fractions = default_fractions()
    torch.testing.assert_close(iou_curve(shuffled_maps, shuffled_masks, fractions), iou_curve(maps, masks, fractions))


def test_random_curve_closed_form_and_monte_carlo():
    masks = _square_mask(size=16, side=6)  # m = 36 of N = 256
    fractions = torch.tensor([0.0, 0.1, 0.25, 0.5, 1.0])
    k = fractions.double() * 256
    closed = k * 36 / 256 / (k + 36 - k * 36 / 256)
    torch.testing.assert_close(random_iou_curve(masks, fractions)[0], closed)
    # k = 25.6 etc. are fractional; the Monte-Carlo mean of random maps' IoU curves agrees
    simulated = iou_curve(random_maps((3000, 16, 16), seed=10), masks.expand(3000, -1, -1), fractions)
    torch.testing.assert_close(simulated.mean(dim=0), closed, atol=3e-3, rtol=0)


def test_ideal_curve_hand_computed_and_reached_by_the_mask_itself():
    masks = _square_mask()  # m = 4, N = 16
    fractions = torch.tensor([0.0, 0.125, 0.25, 0.5, 1.0])
    ideal = ideal_iou_curve(masks, fractions)
    torch.testing.assert_close(ideal, torch.tensor([[0, 0.5, 1, 0.5, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(iou_curve(masks.float(), masks, fractions), ideal)


def test_nra_hand_computed():
    # 2x2, mask = pixel 0, map ranks pixel 1 first and pixel 0 second; k = 0..4
    maps = torch.tensor([[[3.0, 4.0], [2.0, 1.0]]])
    masks = torch.tensor([[[True, False], [False, False]]])
    fractions = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])

    def auc(v):  # trapezoid, step 1/4, range 1
        return 0.25 * (v[0] / 2 + v[1] + v[2] + v[3] + v[4] / 2)

    found = auc([0, 0, 1 / 2, 1 / 3, 1 / 4])
    high = auc([0, 1, 1 / 2, 1 / 3, 1 / 4])
    low = auc([0, 0.25 / 1.75, 0.5 / 2.5, 0.75 / 3.25, 1 / 4])
    assert nra_chance(maps, masks, fractions).item() == pytest.approx((found - low) / (high - low), abs=1e-12)
    # CE-FAM: lower curve a·n with a = 1/4, area a/2 = 1/8: (0.2395833 - 0.125) / (0.4895833 - 0.125)
    assert nra(maps, masks, fractions).item() == pytest.approx((found - 1 / 8) / (high - 1 / 8), abs=1e-12)
    assert nra(maps, masks, fractions).item() == pytest.approx(0.114583333 / 0.364583333, abs=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_nra_reference_points(device):
    masks = (random_maps((8, 12, 12), seed=11) > 0.6).to(device)
    ones = torch.ones(8, dtype=torch.float64, device=device)
    for metric in (nra, nra_chance):
        assert torch.allclose(metric(masks.float(), masks), ones)
    assert (nra_chance((~masks).float(), masks) < 0).all()  # mask ranked last: below chance
    assert (nra((~masks).float(), masks, clamp=False) < 0).all()
    assert (nra((~masks).float(), masks) == 0).all()  # CE-FAM clips at 0 (the authors' max(., 0))
    constant = torch.full((8, 12, 12), 0.3, device=device)
    torch.testing.assert_close(nra_chance(constant, masks), torch.zeros(8, dtype=torch.float64, device=device))
    torch.testing.assert_close(nra_chance(torch.zeros_like(constant), masks), torch.zeros_like(ones))
    # CE-FAM's lower curve a·n lies below chance: a constant map scores the chance curve's normalised area
    fractions = cefam_fractions(144, device=device)
    chance_auc = torch.trapezoid(random_iou_curve(masks, fractions), fractions, dim=1)
    ideal_auc = torch.trapezoid(ideal_iou_curve(masks, fractions), fractions, dim=1)
    a = masks.sum(dim=(1, 2)).double() / 144
    expected = (chance_auc - a / 2) / (ideal_auc - a / 2)
    assert (expected > 0.05).all()
    torch.testing.assert_close(nra(constant, masks), expected)
    torch.testing.assert_close(nra(torch.zeros_like(constant), masks), expected)


def test_cefam_fractions_step_pixel_by_pixel_in_the_first_percent():
    grid = cefam_fractions(64 * 64)  # 4096 px: one bin = 40.96 px
    assert grid.dtype == torch.float64 and grid.numel() == 41 + 100
    torch.testing.assert_close(grid[:41], torch.arange(41, dtype=torch.float64) / 4096)
    torch.testing.assert_close(grid[41:], torch.arange(1, 101, dtype=torch.float64) / 100)
    assert cefam_fractions(100 * 100).numel() == 101 + 99  # 100 px = exactly one bin: merged
    assert cefam_fractions(8 * 8).numel() == 101  # bins finer than a pixel already
    with pytest.raises(ValueError, match="n_pixels"):
        cefam_fractions(0)


def test_small_mask_nra_is_resolved_and_pinned():
    # 64x64, a 20-pixel mask; the map ranks 20 wrong pixels first, then the 20 mask pixels, then the rest
    n, m = 4096, 20
    maps = torch.zeros(1, 64, 64)
    flat = maps.view(-1)
    flat[:40] = torch.arange(40, 0, -1, dtype=torch.float32)  # pixels 0..19 wrong, 20..39 the mask
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks.view(-1)[20:40] = True
    # by hand, in pixel units (area · N): on pixels 0..40 the map's IoU is 0 up to k = 20, then
    # (k - 20)/40: area 5. The ideal is k/20 up to 20 (area 10), then 20/k: trapezoid T over 20..40.
    # From k = 40 on both are 20/k: trapezoid C over 40, 40.96, 81.92, ..., 4096. Lower: a/2 · N = 10.
    t = sum((m / k + m / (k + 1)) / 2 for k in range(20, 40))
    ks = [40.0] + [j * n / 100 for j in range(1, 101)]
    c = sum((m / ks[i] + m / ks[i + 1]) / 2 * (ks[i + 1] - ks[i]) for i in range(len(ks) - 1))
    expected = (5 + c - 10) / (10 + t + c - 10)
    assert expected == pytest.approx(0.825295, abs=1e-6)
    assert nra(maps, masks).item() == pytest.approx(expected, abs=1e-12)
    # 1 % steps alone cannot see the 20 wrong pixels: the map ties the ideal curve at every grid point
    assert nra(maps, masks, default_fractions()).item() == pytest.approx(1.0, abs=1e-12)


def test_cefam_lower_curve_is_linear_with_area_half_the_mask_share():
    masks = _square_mask(size=16, side=6)  # a = 36/256
    fractions = cefam_fractions(256)
    lower = cefam_lower_iou_curve(masks, fractions)
    torch.testing.assert_close(lower[0], fractions * 36 / 256)
    assert torch.trapezoid(lower[0], fractions).item() == pytest.approx(36 / 256 / 2, abs=1e-15)
    assert (lower <= random_iou_curve(masks, fractions) + 1e-15).all()  # below chance


def test_random_maps_score_chance_nra_zero_and_cefam_nra_above_zero_on_average():
    sizes = torch.arange(2000) % 14 + 1  # varied mask sizes: squares of side 1..14 in 16x16
    grid = torch.arange(16)
    masks = (grid[None, :, None] < sizes[:, None, None]) & (grid[None, None, :] < sizes[:, None, None])
    maps = random_maps((2000, 16, 16), seed=12)
    values = nra_chance(maps, masks)
    assert abs(values.mean().item()) < 0.01
    assert values.std().item() > 0.01  # it really is noise around 0, not a constant
    cefam = nra(maps, masks)
    assert 0.1 < cefam.mean().item() < 0.3  # the offset CE-FAM's lower curve leaves (DESIGN: ≈ 0.1-0.3)


def test_nra_undefined_for_empty_and_full_masks():
    maps = random_maps((2, 4, 4), seed=13)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1] = True
    assert nra(maps, masks).isnan().all()
    assert nra_chance(maps, masks).isnan().all()


def test_epg_hand_computed_after_min_max():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 2.0], [3.0, 0.0]], [[-1.0, 2.0], [3.0, 0.0]]])
    masks = torch.tensor(
        [[[True, True], [False, False]], [[True, False], [False, False]], [[False, True], [False, False]]]
    )
    # rescaled: (0, 1/3, 2/3, 1) -> (0 + 1/3) / 2; (0, 3/4, 1, 1/4) -> 0 / 2 and (3/4) / 2
    torch.testing.assert_close(epg(maps, masks), torch.tensor([1 / 6, 0.0, 3 / 8], dtype=torch.float64))
    # the unnormalised share, clipped at 0: 3/10, 0/5, 2/5
    torch.testing.assert_close(epg_raw(maps, masks), torch.tensor([3 / 10, 0 / 5, 2 / 5], dtype=torch.float64))
    # min-max makes EPG ignore offset and scale
    torch.testing.assert_close(epg(3 * maps + 7, masks), epg(maps, masks))


@pytest.mark.parametrize("device", DEVICES)
def test_epg_edge_cases(device):
    masks = _square_mask(batch=4).to(device)
    masks[3] = False
    maps = torch.stack([torch.zeros(4, 4), -torch.ones(4, 4), torch.ones(4, 4), torch.rand(4, 4)]).to(device)
    # all-zero, all-negative constant and constant maps score 0 (kept, not NaN); empty mask: NaN
    result = epg(maps, masks)
    assert result.device.type == device and result.dtype == torch.float64
    assert result[:3].tolist() == [0.0, 0.0, 0.0] and result[3].isnan()
    raw = epg_raw(maps, masks)
    assert raw[[0, 1, 3]].isnan().all() and raw[2].item() == pytest.approx(4 / 16)


def test_epg_sums_fp16_maps_without_overflow():
    maps = torch.zeros(1, 8, 8, dtype=torch.float16)
    maps[:, :4] = 60000.0  # an fp16 sum would be inf
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[:, :4] = True
    assert epg(maps, masks).item() == 1.0
    assert epg_raw(torch.full((1, 8, 8), 60000.0, dtype=torch.float16), masks).item() == 0.5


def test_epg_of_random_maps_is_the_mask_area_on_average():
    masks = _square_mask(batch=2000, size=16, side=8)  # a quarter of the image
    maps = random_maps((2000, 16, 16), seed=14)
    assert epg(maps, masks).mean().item() == pytest.approx(0.25, abs=0.005)
    assert epg_raw(maps, masks).mean().item() == pytest.approx(0.25, abs=0.005)


def test_hit_is_strict_and_keeps_nan():
    result = hit(torch.tensor([0.7, 0.5, 0.2, math.nan], dtype=torch.float64))
    assert result[:3].tolist() == [1.0, 0.0, 0.0] and result[3].isnan()
    assert hit(torch.tensor([0.7, 0.5]), threshold=0.6).tolist() == [1.0, 0.0]


def test_hit_with_coverage_counts_missing_maps_as_misses():
    # five ground-truth pairs: two hits, one low NRA, one concept without a map, one undefined mask
    values = torch.tensor([0.9, 0.6, 0.3, math.nan, math.nan], dtype=torch.float64)
    covered = torch.tensor([True, True, True, False, True])
    result = hit_with_coverage(values, covered)
    assert result[:4].tolist() == [1.0, 1.0, 0.0, 0.0] and result[4].isnan()
    assert hit_rate(values, covered) == pytest.approx(2 / 4)  # the undefined pair is left out
    assert hit_rate(values[:3]) == pytest.approx(2 / 3)
    assert hit_rate(values, covered, threshold=0.7) == pytest.approx(1 / 4)
    # with the NRA of uncovered pairs set to NaN, the per-type means follow CE-FAM's bookkeeping
    out = summarise_by_type({"nra": values, "hit": result}, ["object"] * 5)
    assert out["object"]["nra"] == pytest.approx((0.9 + 0.6 + 0.3) / 3) and out["object"]["hit"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="covered must be a bool"):
        hit_with_coverage(values, covered.float())


def test_best_candidate_picks_the_highest_nra():
    nra_values = torch.tensor([[0.2, 0.7, 0.4, math.nan], [math.nan, math.nan, math.nan, math.nan], [0.0, 0.0, 0.1, 0.0]])
    epg_values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5], [0.9, 0.8, 0.7, 0.6]])
    best, best_epg, index = best_candidate(nra_values, epg_values)
    assert index.tolist() == [1, 0, 2]
    assert best[0].item() == pytest.approx(0.7) and best[1].isnan() and best[2].item() == pytest.approx(0.1)
    assert best_epg.tolist() == pytest.approx([0.2, 0.5, 0.7])
    with pytest.raises(ValueError, match="share one"):
        best_candidate(nra_values, epg_values[:, :2])


def test_summarise_by_type_averages_types_then_types():
    values = {
        "nra": torch.tensor([1.0, 0.0, 0.2, math.nan, 0.6, math.nan]),
        "epg": torch.tensor([0.5, 0.5, 0.1, 0.3, 0.9, math.nan]),
    }
    types = ["color", "color", "shape", "shape", "pattern", "background"]
    out = summarise_by_type(values, types)
    assert list(out) == ["avg", "background", "color", "pattern", "shape"]
    assert out["color"]["nra"] == pytest.approx(0.5)
    assert out["shape"]["nra"] == pytest.approx(0.2)  # NaN ignored
    assert math.isnan(out["background"]["nra"])  # no defined value
    assert out["avg"]["nra"] == pytest.approx((0.5 + 0.2 + 0.6) / 3)  # not the sample mean 0.45
    assert out["avg"]["epg"] == pytest.approx((0.5 + 0.2 + 0.9) / 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: nra(torch.rand(2, 4, 4), torch.ones(2, 4, 4)), "masks must be a bool"),
        (lambda: nra(torch.rand(2, 4, 4), torch.ones(2, 4, 5, dtype=torch.bool)), "masks must be a bool"),
        (lambda: nra(torch.rand(4, 4), torch.ones(4, 4, dtype=torch.bool)), "maps must be a float"),
        (lambda: epg(torch.full((1, 2, 2), math.nan), torch.ones(1, 2, 2, dtype=torch.bool)), "NaN or infinite"),
        (lambda: iou_curve(torch.rand(1, 2, 2), torch.rand(1, 2, 2) > 0, torch.tensor([0.5, 0.2])), "increasing"),
        (lambda: random_iou_curve(torch.ones(1, 2, 2, dtype=torch.bool), torch.tensor([0.0, 1.5])), "in \\[0, 1\\]"),
        (lambda: hit(torch.zeros(2, 2)), "nra_values must be 1-D"),
        (lambda: summarise_by_type({"nra": torch.zeros(3)}, ["color", "shape"]), "must have shape \\(2,\\)"),
        (lambda: summarise_by_type({"nra": torch.zeros(1)}, ["avg"]), "reserved"),
        (lambda: summarise_by_type({}, ["color"]), "values is empty"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_nra_from_curves_equals_nra_and_checks_the_shape():
    maps = random_maps((5, 6, 6), seed=7)
    masks = random_maps((5, 6, 6), seed=8) > 0.6
    fractions = cefam_fractions(36)
    curves = iou_curve(maps, masks, fractions)
    torch.testing.assert_close(nra_from_curves(curves, masks, fractions), nra(maps, masks), equal_nan=True)
    torch.testing.assert_close(nra_chance_from_curves(curves, masks, fractions), nra_chance(maps, masks), equal_nan=True)
    torch.testing.assert_close(nra_from_curves(curves, masks, fractions, clamp=False), nra(maps, masks, clamp=False))
    with pytest.raises(ValueError, match=r"curves must have shape \(5, 101\)"):
        nra_from_curves(curves[:, :-1], masks, fractions)


# --- the two protocols on a 64x64 map with a 20-pixel mask (flat pixels 0..19), from their definitions
N, M_PX = 4096, 20


def _mask_at(pixels) -> torch.Tensor:
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask.view(-1)[list(pixels)] = True
    return mask


def _map(values: dict) -> torch.Tensor:
    out = torch.zeros(1, 64, 64)
    for pixels, value in values.items():
        out.view(-1)[list(pixels)] = value
    return out


def _paper(iou) -> float:
    """Eq. 13 on the grid k = 0..40 pixels, then 1 %, 2 %, ... (trapezoids over n = k/N); iou(k) in
    pixel counts, lower curve a·n (area a/2)."""
    ks = [float(k) for k in range(41)] + [j * N / 100 for j in range(1, 101)]

    def area(f):
        return sum((f(ks[i]) + f(ks[i + 1])) / 2 * (ks[i + 1] - ks[i]) for i in range(len(ks) - 1)) / N

    low = M_PX / N / 2
    return (area(iou) - low) / (area(lambda k: min(k, M_PX) / max(k, M_PX)) - low)


def _authors(tp) -> float:
    """The authors' nra_eval loop: after pixel idx (idx + 1 selected, tp(idx) of them in the mask),
    at idx < 40 (weight 1/N) and idx = 40, 80, ..., 4080 (weight 1/100): IoU tp/(fp + m) and the
    ideal idx/m or m/idx; max(AUC - m/N/2, 0) / (AUC_high - m/N/2)."""
    points = [(i, 1 / N) for i in range(40)] + [(i, 1 / 100) for i in range(40, N, 40)]
    auc = sum(w * tp(i) / (i + 1 - tp(i) + M_PX) for i, w in points)
    high = sum(w * (i / M_PX if i < M_PX else M_PX / i) for i, w in points)
    low = M_PX / N / 2
    return max(auc - low, 0) / (high - low)


MASK = range(20)
WRONG_FIRST = _map({range(20, 40): 2.0, MASK: 1.0})  # 20 wrong pixels ranked first, then the mask
CASES = {
    # name: (map, paper NRA, authors' NRA)
    "20 wrong pixels first": (
        WRONG_FIRST,
        _paper(lambda k: 0.0 if k <= 20 else (k - 20) / 40 if k <= 40 else 20 / k),
        _authors(lambda i: min(max(i + 1 - 20, 0), 20)),
    ),
    # constant: pro-rata ties give the chance curve; the authors' ties put pixel 4095 first, the mask
    # (pixels 0..19) last: only idx = 4080 (pixels 4095..15) holds 5 mask pixels, below a/2: 0
    "all zero": (
        _map({}),
        _paper(lambda k: (k * M_PX / N) / (k + M_PX - k * M_PX / N)),
        _authors(lambda i: max(i + 1 - (N - 20), 0)),
    ),
    # the mask itself: the ideal curve (1) here; the authors' ideal lags a pixel behind their IoU
    "binary = mask": (_map({MASK: 1.0}), 1.0, _authors(lambda i: min(i + 1, 20))),
    # one tied run of 40 pixels holding the mask: pro rata k/2 in the mask for k <= 40; the authors'
    # ties go by descending index, pixels 39..20 (wrong) before 19..0: the "wrong first" ranking
    "quantised": (
        _map({range(40): 1.0}),
        _paper(lambda k: (k / 2) / (k + 20 - k / 2) if k <= 40 else 20 / k),
        _authors(lambda i: min(max(i + 1 - 20, 0), 20)),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_both_protocols_hand_computed(case):
    maps, paper, authors = CASES[case]
    mask = _mask_at(MASK)
    assert nra(maps, mask).item() == pytest.approx(paper, abs=1e-12)
    assert nra_authors(maps, mask).item() == pytest.approx(authors, abs=1e-12)


def test_protocol_values_pinned():
    _, paper, authors = CASES["20 wrong pixels first"]
    assert (round(paper, 4), round(authors, 4)) == (0.8253, 0.8404)  # the nra docstring's figures
    assert CASES["all zero"][2] == 0 and CASES["all zero"][1] == pytest.approx(0.0886, abs=1e-4)
    assert CASES["binary = mask"][2] == pytest.approx(0.99732, abs=1e-5)  # not 1: the authors' ideal is a pixel behind
    assert CASES["quantised"][2] == authors  # the authors' tie order makes the run a ranking
    # the same all-zero map with the mask in the last 20 pixels: ranked first by the authors' ties
    last = _mask_at(range(N - 20, N))
    assert nra_authors(_map({}), last).item() == pytest.approx(CASES["binary = mask"][2], abs=1e-12)
    assert nra(_map({}), last).item() == pytest.approx(CASES["all zero"][1], abs=1e-12)
    # EPG is one function for both; only the bookkeeping differs: 1/3, 0, 1, 1/2
    epgs = [epg(CASES[c][0], _mask_at(MASK)).item() for c in CASES]
    assert epgs == pytest.approx([1 / 3, 0.0, 1.0, 0.5], abs=1e-12)


def test_authors_areas_and_paper_areas():
    mask = _mask_at(MASK)
    auc, high, low = nra_authors_parts(WRONG_FIRST, mask)
    assert low.item() == pytest.approx(10 / N, abs=1e-15)
    assert ((auc - low).clamp(min=0) / (high - low)).item() == pytest.approx(CASES["20 wrong pixels first"][2], abs=1e-12)
    fractions = cefam_fractions(N)
    curves = iou_curve(WRONG_FIRST, mask, fractions)
    auc, high, low = auc_from_curves(curves, mask, fractions)
    assert low.item() == pytest.approx(10 / N, abs=1e-15)  # the trapezoid of a·n is exact
    assert ((auc - low) / (high - low)).item() == pytest.approx(nra(WRONG_FIRST, mask).item(), abs=1e-12)
    empty = torch.zeros_like(mask)
    assert all(part.isnan().all() for part in (*nra_authors_parts(WRONG_FIRST, empty), *auc_from_curves(curves, empty, fractions)))
    # under 100 pixels every pixel is a point of weight 1/N: a 2x2 map ranking the 1-pixel mask second
    small, small_mask = torch.tensor([[[3.0, 4.0], [2.0, 1.0]]]), torch.tensor([[[True, False], [False, False]]])
    auc, high = (0 + 1 / 2 + 1 / 3 + 1 / 4) / 4, (0 + 1 + 1 / 2 + 1 / 3) / 4  # IoU after 1..4 pixels; ideal at idx 0..3
    assert nra_authors(small, small_mask).item() == pytest.approx((auc - 1 / 8) / (high - 1 / 8), abs=1e-12)


def test_authors_choice_sets_epg_to_zero_without_a_positive_nra():
    nra_values = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.5, 0.5], [math.nan, 0.3, 0.0]], dtype=torch.float64)
    epg_values = torch.tensor([[0.4, 0.3, 0.2], [0.1, 0.2, 0.3], [0.9, 0.6, 0.5]], dtype=torch.float64)
    best, chosen_epg, index = authors_best_candidate(nra_values, epg_values)
    assert best.tolist() == [0.0, 0.5, 0.3] and chosen_epg.tolist() == [0.0, 0.2, 0.6] and index.tolist() == [-1, 1, 1]
    _, paper_epg, paper_index = best_candidate(nra_values, epg_values)  # the paper's keeps the chosen map's EPG
    assert paper_epg.tolist() == [0.4, 0.2, 0.6] and paper_index.tolist() == [0, 1, 1]
