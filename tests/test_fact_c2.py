"""C²-Score pieces (lib.methods.fact.c2): the closed form against the brute-force double sum, known
values, zero-row padding, attribution encoding and top-image selection."""

import math

import pytest
import torch

from lib.methods.fact.c2 import c2_score, encode_attribution, select_images, weighted_mean_pairwise_cosine


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force(e: torch.Tensor, w: torch.Tensor) -> float:
    """sum_{i != j} w_i w_j cos(e_i, e_j) / sum_{i != j} w_i w_j, with an explicit double loop."""
    num = den = 0.0
    for i in range(len(e)):
        for j in range(len(e)):
            if i != j:
                cos = torch.nn.functional.cosine_similarity(e[i], e[j], dim=0).item()
                num += w[i].item() * w[j].item() * cos
                den += w[i].item() * w[j].item()
    return num / den


def test_closed_form_equals_brute_force_batched():
    e = torch.randn(5, 7, 4, generator=gen(0), dtype=torch.float64) + 0.3
    w = torch.rand(5, 7, generator=gen(1), dtype=torch.float64) * 10
    got = weighted_mean_pairwise_cosine(e, w)
    assert got.shape == (5,)
    for j in range(5):
        assert got[j].item() == pytest.approx(brute_force(e[j], w[j]), rel=1e-9, abs=1e-12)
    # float32 input, same answer to float32 precision; scaling e rows or w changes nothing.
    torch.testing.assert_close(weighted_mean_pairwise_cosine(e.float(), w.float()).double(), got, rtol=1e-4, atol=1e-5)
    scales = torch.rand(5, 7, 1, generator=gen(2), dtype=torch.float64) + 0.1
    torch.testing.assert_close(weighted_mean_pairwise_cosine(e * scales, 3 * w), got)


def test_known_values():
    v = torch.randn(8, generator=gen(3))
    assert weighted_mean_pairwise_cosine(v.expand(6, 8), torch.rand(6)).item() == pytest.approx(1.0, abs=1e-6)
    assert weighted_mean_pairwise_cosine(torch.eye(5) * 3, torch.rand(5) + 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert weighted_mean_pairwise_cosine(torch.stack([v, -2 * v]), torch.tensor([0.3, 5.0])).item() == pytest.approx(
        -1.0, abs=1e-6
    )
    # Two equal-weight pairs, cos 1 within, -1 across: (2 * 1 + 4 * -1) / 6 = -1/3
    e = torch.stack([v, v, -v, -v])
    assert weighted_mean_pairwise_cosine(e, torch.ones(4)).item() == pytest.approx(-1 / 3, abs=1e-6)


def test_zero_rows_are_ignored_and_undefined_is_nan():
    e = torch.randn(6, 5, generator=gen(4))
    w = torch.rand(6, generator=gen(5)) + 0.1
    base = weighted_mean_pairwise_cosine(e, w)
    padded = weighted_mean_pairwise_cosine(torch.cat([e, torch.zeros(3, 5)]), torch.cat([w, torch.ones(3)]))
    torch.testing.assert_close(padded, base)
    assert math.isnan(weighted_mean_pairwise_cosine(e[:1], w[:1]).item())
    with pytest.raises(ValueError):
        weighted_mean_pairwise_cosine(e, -w)
    with pytest.raises(ValueError):
        weighted_mean_pairwise_cosine(e, w[:5])


def test_encode_attribution_known_answers():
    feats = torch.randn(3, 4, 5, 6, generator=gen(6))
    a = torch.zeros(3, 5, 6)
    a[0, 2, 3] = 7.0  # one-hot -> the feature there
    a[1] = 1.0  # uniform -> the spatial mean
    a[2, 0, 0] = -5.0  # negative only -> clipped to nothing -> zero row
    e = encode_attribution(a, feats)
    torch.testing.assert_close(e[0], feats[0, :, 2, 3])
    torch.testing.assert_close(e[1], feats[1].mean(dim=(1, 2)))
    assert torch.equal(e[2], torch.zeros(4))
    rand = torch.rand(3, 5, 6, generator=gen(7))
    expected = (rand[:, None] * feats).sum(dim=(2, 3)) / rand.sum(dim=(1, 2))[:, None]
    torch.testing.assert_close(encode_attribution(rand, feats), expected)
    with pytest.raises(ValueError):
        encode_attribution(a, feats[:, :, :4])


def test_select_images_counts_and_order():
    presence = torch.rand(400, 3, generator=gen(8))
    sel = select_images(presence)
    assert sel.index.shape == sel.presence.shape == (3, 20)  # 5% of 400 > 10
    for j in range(3):
        top = presence[:, j].topk(20).indices
        assert set(sel.index[j].tolist()) == set(top.tolist())
        torch.testing.assert_close(sel.presence[j], presence[sel.index[j], j])
        assert (sel.presence[j][:-1] >= sel.presence[j][1:]).all()
    assert select_images(torch.rand(100, 2)).index.shape == (2, 10)  # 5% = 5 < 10
    assert select_images(torch.rand(7, 2)).index.shape == (2, 7)  # fewer images than 10
    assert select_images(torch.rand(101, 1)).index.shape == (1, 10)
    assert select_images(torch.rand(1000, 1), top_frac=0.011).index.shape == (1, 11)  # ceil


def test_c2_score_is_difference_to_baseline():
    e = torch.randn(2, 6, 4, generator=gen(9)) + 2.0
    base = torch.randn(2, 6, 4, generator=gen(10))
    w = torch.rand(2, 6, generator=gen(11))
    expected = weighted_mean_pairwise_cosine(e, w) - weighted_mean_pairwise_cosine(base, w)
    torch.testing.assert_close(c2_score(e, w, base), expected)
    assert (c2_score(e, w, base) > 0).all()  # shared offset -> consistent
