"""SALF-CBM bottleneck: cubic cosine loss, exact val scores, training, concept filtering."""

import math

import pytest
import torch
import torch.nn.functional as F

from lib.core.distributed import Ranks
from lib.kernels.registration import sample_features
from lib.methods.salf.cbl import (
    ConceptBottleneck,
    concept_scores,
    cubic_cosine_loss,
    cubic_cosine_similarity,
    filter_concepts,
    train_bottleneck,
)


def reference_cos3(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LF-CBM's cos_similarity_cubed_single, applied per (concept, location) in float64."""
    out = []
    for x in (pred.double(), target.double()):
        x = (x - x.mean(dim=0, keepdim=True)) ** 3
        out.append(x / x.norm(dim=0, keepdim=True))
    return (out[0] * out[1]).sum(dim=0)


def test_hand_computed_value():
    # pred column [0, 1, 2] -> centred cube [-1, 0, 1]; target [0, 0, 3] -> centred [-1, -1, 2],
    # cube [-1, -1, 8]; cos = (1 + 0 + 8) / (sqrt(2) * sqrt(66)).
    pred = torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1)
    target = torch.tensor([0.0, 0.0, 3.0]).view(3, 1, 1, 1)
    sim = cubic_cosine_similarity(pred, target)
    assert sim.shape == (1, 1, 1)
    assert sim.item() == pytest.approx(9 / math.sqrt(132), abs=1e-6)


def test_matches_reference_formula_on_random_data():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 5, 3, 3, generator=g)
    ours = cubic_cosine_similarity(pred, target).double()
    torch.testing.assert_close(ours, reference_cos3(pred, target), atol=1e-5, rtol=0)


def test_perfect_and_inverted_correlation():
    target = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cubic_cosine_similarity(target, target), torch.ones(4, 2, 2))
    torch.testing.assert_close(cubic_cosine_similarity(-target, target), -torch.ones(4, 2, 2))
    assert cubic_cosine_loss(target, target).item() == pytest.approx(-1.0, abs=1e-6)


def test_scale_and_shift_invariance_including_tiny_deviations():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 12, 3, 2, 2, generator=g)
    base = cubic_cosine_loss(pred, target)
    assert cubic_cosine_loss(3.5 * pred + 7.0, target).item() == pytest.approx(base.item(), abs=1e-5)
    # CLIP-like targets: offset 0.25, deviations of 1e-5 (cubes ~1e-15, squares below float32 normals).
    assert cubic_cosine_loss(pred, 0.25 + 1e-5 * target).item() == pytest.approx(base.item(), abs=1e-3)


def test_zero_variance_column_is_finite_and_scores_zero():
    pred = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(3), requires_grad=True)
    target = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(4))
    target[:, 1] = 0.5  # a concept CLIP scores identically on every image
    sim = cubic_cosine_similarity(pred, target)
    assert torch.isfinite(sim).all() and sim[1].item() == 0.0
    cubic_cosine_loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="at least 2 images"):
        cubic_cosine_similarity(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="equal shapes"):
        cubic_cosine_similarity(torch.zeros(4, 2, 3, 3), torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match="in_channels"):
        ConceptBottleneck(0, 2, POSITIONS)
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        ConceptBottleneck(8, 2, POSITIONS)(torch.zeros(2, 7, 3, 3))
    with pytest.raises(ValueError, match=r"positions must have shape \(G, G, 2\)"):
        ConceptBottleneck(8, 2, torch.zeros(3, 2))


def grid_points(ticks: list[float]) -> torch.Tensor:
    """(G, G, 2) grid_sample positions (x, y) on the same ticks along both axes."""
    t = torch.tensor(ticks)
    ys, xs = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xs, ys], dim=-1)


# cells of a 6 x 6 map are centred at -5/6, -3/6, ..., 5/6: these sit on cell 1, between cells 2 and 3, on cell 4
POSITIONS = grid_points([-0.5, 0.0, 0.5])


def test_bottleneck_samples_at_its_positions_then_projects():
    features = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5)).half()
    model = ConceptBottleneck(4, 3, POSITIONS)
    out = model(features)
    assert out.shape == (2, 3, 3, 3) and out.dtype == torch.float32 and model.grid == 3
    x = features.float()
    rows = torch.stack([x[:, :, 1], (x[:, :, 2] + x[:, :, 3]) / 2, x[:, :, 4]], dim=2)  # on, between, on
    sampled = torch.stack([rows[..., 1], (rows[..., 2] + rows[..., 3]) / 2, rows[..., 4]], dim=3)
    torch.testing.assert_close(model.sample(features), sampled, atol=1e-5, rtol=0)
    expected = torch.einsum("mc,bchw->bmhw", model.conv.weight[:, :, 0, 0], sampled)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # no positions: LF-CBM's non-spatial bottleneck, one cell of average-pooled features
    pooled = ConceptBottleneck(4, 3, None)
    assert pooled.grid == 1 and pooled.positions is None
    torch.testing.assert_close(pooled.sample(features), x.mean(dim=(2, 3), keepdim=True))


def _linear_problem(n: int, seed: int):
    """Features (n, 6, 6, 6) sampled at POSITIONS and P = a fixed 1x1 conv of those samples."""
    g = torch.Generator().manual_seed(seed)
    channels, concepts = 6, 4
    features = torch.randn(n, channels, 6, 6, generator=g)
    true_weight = torch.randn(concepts, channels, 1, 1, generator=g)
    sampled = sample_features(features, POSITIONS)
    return sampled, F.conv2d(sampled, true_weight)


def _source(sampled, target, batch_size):
    return lambda: iter(zip(sampled.split(batch_size), target.split(batch_size)))


def test_concept_scores_are_exact_over_the_whole_val_set():
    features, target = _linear_problem(30, seed=6)
    model = ConceptBottleneck(6, 4, POSITIONS)
    target = target + torch.randn(target.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = cubic_cosine_similarity(model.project(features), target).flatten(1).mean(dim=1)
    streamed = concept_scores(model, _source(features, target, batch_size=7))  # uneven 7,7,7,7,2
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=0)
    with torch.no_grad():
        pairs = zip(features.split(10), target.split(10))
        per_batch = [cubic_cosine_similarity(model.project(f), t).flatten(1).mean(dim=1) for f, t in pairs]
    batch_means = torch.stack(per_batch).mean(dim=0)
    assert (batch_means - full).abs().max() > 1e-3  # the shortcut would have been measurably wrong


def test_training_recovers_a_linear_target():
    features, target = _linear_problem(192, seed=8)
    train = _source(features[:128], target[:128], batch_size=32)
    val = _source(features[128:], target[128:], batch_size=64)
    calls = []
    model, history = train_bottleneck(
        train, val, 6, 4, POSITIONS, lr=0.05, max_steps=60, eval_every=10, patience=3, seed=0,
        progress=lambda step, metrics: calls.append(step),
    )
    assert history["best_val_loss"] < -0.98
    assert history["best_val_loss"] == min(history["val_loss"])
    assert history["val_loss"][0] > -0.9  # it did have to learn
    # The returned weights are the best evaluated ones.
    assert -concept_scores(model, val).mean().item() == pytest.approx(history["best_val_loss"], abs=1e-6)
    assert len(history["step"]) == len(history["train_loss"]) == history["val_step"][-1]
    assert calls == history["val_step"]
    assert not model.training and torch.equal(model.positions, POSITIONS)


def test_training_is_seeded_and_leaves_global_rng_alone():
    features, target = _linear_problem(64, seed=9)
    source = _source(features, target, batch_size=32)
    state = torch.random.get_rng_state()
    runs = [train_bottleneck(source, source, 6, 4, POSITIONS, max_steps=3, eval_every=3, seed=1)[0] for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(runs[0].conv.weight, runs[1].conv.weight, atol=0, rtol=0)


def test_training_rejects_bad_arguments():
    features, target = _linear_problem(8, seed=10)
    source = _source(features, target, batch_size=4)
    with pytest.raises(ValueError, match="patience"):
        train_bottleneck(source, source, 6, 4, POSITIONS, patience=0)
    with pytest.raises(ValueError, match="no batches"):
        train_bottleneck(lambda: iter(()), source, 6, 4, POSITIONS)


def test_filter_concepts_keeps_rows_at_or_above_threshold():
    model = ConceptBottleneck(5, 4, POSITIONS)
    pruned, keep = filter_concepts(model, torch.tensor([0.5, 0.1, 0.45, 0.44]), threshold=0.45)
    assert keep.tolist() == [0, 2] and torch.equal(pruned.positions, POSITIONS)
    torch.testing.assert_close(pruned.conv.weight, model.conv.weight[[0, 2]])
    with pytest.raises(ValueError, match="no concept reaches threshold=0.9"):
        filter_concepts(model, torch.tensor([0.5, 0.1, 0.45, 0.44]), threshold=0.9)


def test_ddp_on_two_ranks_equals_one_process_on_the_global_batch(ddp_results):
    from tests.ddp_worker import cbl_case

    ddp, one = ddp_results["cbl"], cbl_case(Ranks())
    assert one["val_loss"][-1] < one["val_loss"][0]  # it learns, so the steps are worth comparing
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 96, 128, 7), (32, 40, 256, 3)])
def test_step_bytes_is_the_measured_peak_of_a_training_step(shape):
    """The estimate the cbl stage checks free memory against is the step's peak tensor memory
    (torch's MemTracker on real CPU tensors), never below it and above it by at most 2 % plus the
    optimiser's (M, C) tensors (counted in full, not all alive at the peak)."""
    from benchmarks.cbl_memory import tracked_peak
    from lib.methods.salf.cbl import step_bytes

    batch, n_concepts, channels, grid = shape
    measured = tracked_peak(*shape, fake=False)
    assert measured <= step_bytes(*shape) <= 1.02 * measured + 4 * 4 * n_concepts * channels
