"""C²-Score pieces (FaCT §4): how consistently a concept's top images point at the same thing.

Per concept j: take its top images by presence (`select_images`); attribute P_j to the input,
A = clip(sum_ch x * dP_j/dx, 0) (caller's backbone); encode each attribution as the A-weighted mean
of a foundation model's upsampled dense features F (`encode_attribution`); the score is the
presence-weighted mean pairwise cosine of those encodings (`weighted_mean_pairwise_cosine`) minus
the same for a random-map baseline (`c2_score`).

Closed form. For unit vectors e_i and weights w_i summing to 1,
    sum_{i != j} w_i w_j e_i . e_j = ||sum_i w_i e_i||^2 - sum_i w_i^2,
    sum_{i != j} w_i w_j           = 1 - sum_i w_i^2,
so the weighted mean over pairs costs O(N D) per concept, with no N x N matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SelectedImages", "c2_score", "encode_attribution", "select_images", "top_count", "weighted_mean_pairwise_cosine"]

_EPS = 1e-12


class SelectedImages(NamedTuple):
    """Per concept j: `index` (J, m) image indices, highest presence first; `presence` (J, m) theirs."""

    index: Tensor
    presence: Tensor


def weighted_mean_pairwise_cosine(e: Tensor, w: Tensor) -> Tensor:
    """Weighted mean of cos(e_i, e_j) over ordered pairs i != j, pair weight w_i w_j.

    e (..., N, D), w (..., N) non-negative; leading dims are batched (e.g. one row per concept).
    Rows of e that are zero or non-finite (an attribution with no mass) get weight 0, so padding
    with zero rows is allowed. Returns (...); NaN where fewer than two rows carry weight."""
    if e.shape[:-1] != w.shape:
        raise ValueError(f"e (..., N, D) and w (..., N) disagree: {tuple(e.shape)}, {tuple(w.shape)}")
    if bool((w < 0).any()):
        raise ValueError("weights must be >= 0")
    out_dtype = torch.promote_types(e.dtype, torch.float32)
    # float64 inside: 1 - sum w^2 cancels badly when one image carries most of the weight.
    e, w = e.to(torch.float64), w.to(torch.float64)
    norm = e.norm(dim=-1)
    valid = torch.isfinite(norm) & (norm > _EPS)
    unit = torch.where(valid[..., None], e / norm.clamp_min(_EPS)[..., None], torch.zeros_like(e))
    w = torch.where(valid, w, torch.zeros_like(w))
    w = w / w.sum(dim=-1, keepdim=True)  # rows with no weight become NaN, as documented
    sum_sq = w.square().sum(dim=-1)
    mean_vec = (w[..., None] * unit).sum(dim=-2)
    pair_weight = 1.0 - sum_sq
    score = (mean_vec.square().sum(dim=-1) - sum_sq) / pair_weight
    nan = torch.full_like(score, math.nan)
    return torch.where(pair_weight > 1e-12, score, nan).to(out_dtype)


def encode_attribution(attribution: Tensor, feats: Tensor) -> Tensor:
    """e_n = sum_hw A_n F_n / sum_hw A_n: attribution maps A (N, H, W) (clipped at 0 here) and dense
    features F (N, D, H, W) already upsampled to the maps' size -> (N, D). An all-zero map gives a zero
    row, which `weighted_mean_pairwise_cosine` ignores."""
    if attribution.ndim != 3 or feats.ndim != 4 or feats.shape[0] != attribution.shape[0] \
            or feats.shape[2:] != attribution.shape[1:]:
        raise ValueError(
            f"need A (N, H, W) and F (N, D, H, W) of one size, got {tuple(attribution.shape)}, {tuple(feats.shape)}"
        )
    a = attribution.clamp_min(0).to(feats.dtype)
    mass = a.sum(dim=(1, 2))
    weighted = torch.einsum("nhw,ndhw->nd", a, feats)
    return torch.where(mass[:, None] > 0, weighted / mass.clamp_min(_EPS)[:, None], torch.zeros_like(weighted))


def top_count(n: int, top_frac: float = 0.05, min_images: int = 10) -> int:
    """m = min(N, max(ceil(top_frac * N), min_images)): how many top images of N a concept keeps."""
    if not 0 < top_frac <= 1 or min_images < 1:
        raise ValueError(f"need 0 < top_frac <= 1 and min_images >= 1, got {top_frac}, {min_images}")
    return min(n, max(math.ceil(top_frac * n), min_images))


def select_images(presence: Tensor, top_frac: float = 0.05, min_images: int = 10) -> SelectedImages:
    """Each concept's top m = top_count(N, top_frac, min_images) images by presence, from presence
    (N images, J concepts). Images with zero presence may fill up the m; as weights they count for
    nothing."""
    if presence.ndim != 2:
        raise ValueError(f"presence must be (N, J), got {tuple(presence.shape)}")
    m = top_count(presence.shape[0], top_frac, min_images)
    values, index = presence.T.topk(m, dim=1, sorted=True)
    return SelectedImages(index=index, presence=values)


def c2_score(e: Tensor, w: Tensor, e_baseline: Tensor) -> Tensor:
    """Weighted mean pairwise cosine of the concepts' encodings minus that of a baseline (e.g. random
    attribution maps on the same images), same weights. e, e_baseline (..., N, D), w (..., N)."""
    return weighted_mean_pairwise_cosine(e, w) - weighted_mean_pairwise_cosine(e_baseline, w)
