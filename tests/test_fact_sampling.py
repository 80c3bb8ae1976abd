"""Training-position sampling (lib.methods.fact.sampling): budget, gathering, no replacement,
weighting, all-zero and few-positive rows, seeding."""

import pytest
import torch

from lib.methods.fact.sampling import position_scores, positions_per_image, sample_positions


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_positions_per_image_budget():
    assert positions_per_image(512, 7, 7) == 49  # 36864 // 512 = 72 > 49
    assert positions_per_image(2048, 7, 7) == 18
    assert positions_per_image(1024, 14, 14) == 36
    assert positions_per_image(100_000, 7, 7) == 1  # at least one
    with pytest.raises(ValueError):
        positions_per_image(8, 2, 2, budget=0)


def test_position_scores():
    acts = torch.randn(2, 3, 4, 5, generator=gen(0))
    grads = torch.randn(2, 3, 4, 5, generator=gen(1))
    expected = torch.einsum("bchw,bchw->bhw", acts, grads).abs()
    torch.testing.assert_close(position_scores(acts, grads), expected)
    with pytest.raises(ValueError):
        position_scores(acts, grads[:, :2])


def test_vectors_indices_and_no_replacement():
    b, c, h, w = 3, 8, 4, 5
    acts = torch.randn(b, c, h, w, generator=gen(0))
    scores = torch.rand(b, h, w, generator=gen(1))
    out = sample_positions(acts, scores, budget=8 * 6, generator=gen(2))
    n = 6
    assert out.vectors.shape == (b * n, c) and out.image.shape == out.position.shape == (b * n,)
    assert out.image.tolist() == [i for i in range(b) for _ in range(n)]
    # Each row is the feature vector at (image, position).
    expected = acts[out.image, :, out.position // w, out.position % w]
    assert torch.equal(out.vectors, expected)
    for i in range(b):
        assert len(set(out.position[out.image == i].tolist())) == n


def test_zero_scores_never_drawn_when_enough_positives():
    acts = torch.randn(50, 4, 3, 3, generator=gen(0))
    scores = torch.zeros(50, 3, 3)
    scores[:, 0, 1] = 5.0
    scores[:, 2, 2] = 1e-6  # tiny but positive still beats every zero
    out = sample_positions(acts, scores, budget=4 * 2, generator=gen(1))
    assert set(out.position.tolist()) == {1, 8}


def test_weighting_and_uniform_fallback_frequencies():
    """n = 1 draw per image, many identical images: frequencies follow the scores; an all-zero score
    row is uniform."""
    rows = 8000
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    scores = torch.cat([weights.expand(rows, 4), torch.zeros(rows, 4)]).reshape(2 * rows, 2, 2)
    acts = torch.zeros(2 * rows, 16, 2, 2)
    out = sample_positions(acts, scores, budget=16, generator=gen(3))
    weighted = torch.bincount(out.position[:rows], minlength=4) / rows
    uniform = torch.bincount(out.position[rows:], minlength=4) / rows
    # Binomial std <= sqrt(0.25 / 8000) = 0.0056; allow ~4 std.
    torch.testing.assert_close(weighted, weights / weights.sum(), atol=0.025, rtol=0)
    torch.testing.assert_close(uniform, torch.full((4,), 0.25), atol=0.025, rtol=0)


def test_few_positives_take_all_then_uniform_rest():
    rows = 4000
    scores = torch.zeros(rows, 1, 6)
    scores[:, 0, 4] = 1.0  # one positive position, three draws
    out = sample_positions(torch.zeros(rows, 2, 1, 6), scores, budget=2 * 3, generator=gen(4))
    pos = out.position.reshape(rows, 3)
    assert (pos == 4).any(dim=1).all()
    rest = pos[pos != 4]
    freq = torch.bincount(rest, minlength=6)[[0, 1, 2, 3, 5]] / rest.numel()
    torch.testing.assert_close(freq, torch.full((5,), 0.2), atol=0.03, rtol=0)


def test_seeded_and_validated():
    acts = torch.randn(4, 8, 5, 5, generator=gen(0))
    scores = torch.rand(4, 5, 5, generator=gen(1))
    a = sample_positions(acts, scores, budget=40, generator=gen(9))
    b = sample_positions(acts, scores, budget=40, generator=gen(9))
    c = sample_positions(acts, scores, budget=40, generator=gen(10))
    assert torch.equal(a.position, b.position) and not torch.equal(a.position, c.position)
    with pytest.raises(ValueError):
        sample_positions(acts, -scores, generator=gen(0))
    with pytest.raises(ValueError):
        sample_positions(acts, scores[:, :4], generator=gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    acts = torch.randn(4, 8, 5, 5, device="cuda")
    scores = torch.rand(4, 5, 5, device="cuda")
    scores[1] = 0
    out = sample_positions(acts, scores, budget=40, generator=torch.Generator("cuda").manual_seed(0))
    assert out.vectors.device.type == "cuda" and out.vectors.shape == (20, 8)
    assert torch.equal(out.vectors, acts[out.image, :, out.position // 5, out.position % 5])
