"""FaCT's stage helpers against brute force: the latent-concept correlation and matching, the streamed
top images, and the pooling matrix that stands for upsampled dense features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.methods.fact.c2 import TopImages, pooling_matrix, selection_depth
from lib.methods.fact.matching import LatentCorrelation, Matching


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_latent_correlation_equals_numpy_over_all_cells():
    codes = torch.rand(6, 4, 4, 5, generator=gen(0)) * (torch.rand(6, 4, 4, 5, generator=gen(1)) > 0.6)
    masks = torch.rand(6, 3, 16, 16, generator=gen(2)) > 0.7
    masks[:, 2] = False  # a concept that never occurs: r = 0, not NaN
    correlation = LatentCorrelation(5, 3)
    correlation.add(codes[:4], masks[:4])  # two batches stream to the same result
    correlation.add(codes[4:], masks[4:])
    shares = F.avg_pool2d(masks.float(), 4).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    z = codes.reshape(-1, 5).numpy()
    expected = np.corrcoef(np.concatenate([z, shares[:, :2]], axis=1).T)[:5, 5:]
    got = correlation.correlation()
    np.testing.assert_allclose(got[:, :2].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(got[:, 2], torch.zeros(5, dtype=torch.float64))


def test_a_latent_that_is_the_mask_correlates_perfectly_and_is_matched():
    masks = torch.rand(8, 2, 8, 8, generator=gen(3)) > 0.5
    shares = F.avg_pool2d(masks.float(), 2).permute(0, 2, 3, 1)  # (8, 4, 4, 2)
    noise = torch.rand(8, 4, 4, 2, generator=gen(4))
    codes = torch.cat([noise[..., :1], 3 * shares[..., 1:], noise[..., 1:], 2 * shares[..., :1]], dim=-1)  # latent 3 = concept 0
    correlation = LatentCorrelation(4, 2)
    correlation.add(codes, masks)
    matching = Matching.from_correlation(correlation.correlation(), ["a", "b"], threshold=0.9)
    assert matching.latents == (3, 1) and matching.scores == pytest.approx((1.0, 1.0))
    assert matching.found == 2 and matching.latent_concepts[3] == 0 and matching.label(3) == "a r=1.00"
    assert Matching.from_json(matching.to_json()) == matching


def test_streamed_top_images_equal_the_whole_arrays_top_and_count_the_present_images():
    presence = torch.rand(50, 7, generator=gen(5))
    presence[presence < 0.3] = 0
    m = selection_depth(50, 0.1, 6)
    assert m == 7  # max(ceil(0.1 * 50) + 2, 6 + 1)
    top, other = TopImages(m), TopImages(m)
    rows = torch.arange(100, 150)
    for start in range(0, 50, 8):  # two streams (torchrun ranks) merged equal one
        (top if start < 24 else other).add(presence[start : start + 8], rows[start : start + 8])
    top.merge(other)
    streamed = top.result()
    values, index = presence.topk(m, dim=0)
    assert streamed.index.shape == (7, m)
    torch.testing.assert_close(streamed.presence, values.T)
    assert torch.equal(streamed.index, index.T + 100)
    assert top.n_positive.tolist() == (presence > 0).sum(dim=0).tolist()


def test_pooling_matrix_is_the_adjoint_of_bilinear_upsampling():
    """sum_pixels A * upsample(F) == (A_flat @ U) . F on the grid, and U's rows sum to 1."""
    feats = torch.randn(3, 5, 2, 3, generator=gen(6), dtype=torch.float64)
    maps = torch.rand(3, 8, 12, generator=gen(7), dtype=torch.float64)
    pool = pooling_matrix((2, 3), (8, 12)).double()
    up = F.interpolate(feats, size=(8, 12), mode="bilinear", align_corners=False)
    direct = torch.einsum("nhw,ndhw->nd", maps, up)
    pooled = (maps.flatten(1) @ pool).reshape(3, 2, 3)
    torch.testing.assert_close(torch.einsum("nhw,ndhw->nd", pooled, feats), direct)
    torch.testing.assert_close(pool.sum(dim=1), torch.ones(96, dtype=torch.float64))
