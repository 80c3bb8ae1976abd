"""Which feature-map positions the SAE trains on (FaCT's training-set construction).

Per image, n = min(budget // C, H*W) positions are drawn without replacement with probability
proportional to |sum_c grad_c * act_c| of the predicted logit, so the stored data set has the same
size whatever the layer's width (FaCT: budget 36864 = 72 * 512) and favours positions that matter
for the decision. Rows whose scores are all zero fall back to uniform; rows with fewer than n
positive scores take all positive positions first, then uniform among the rest.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SampledPositions", "position_scores", "positions_per_image", "sample_positions"]

# Weight given to zero-score positions, relative to a row's total of 1. torch.multinomial without
# replacement is an exponential race (topk of w / Exp(1)); with this floor every zero-score position
# ranks after every positive one (float32 scores normalised to sum 1 are far above 1e-200), and among
# themselves uniformly at random, instead of torch picking them in index order.
_FLOOR = 1e-200


class SampledPositions(NamedTuple):
    """`vectors` (B*n, C) feature vectors; `image` (B*n,) their image index in the batch; `position`
    (B*n,) their flat position h * W + w. Image-major: rows b*n ... b*n + n - 1 belong to image b."""

    vectors: Tensor
    image: Tensor
    position: Tensor


def position_scores(acts: Tensor, grads: Tensor) -> Tensor:
    """|sum_c grad * act| per position: (B, C, H, W) x2 -> (B, H, W). `grads` = d(logit)/d(acts)."""
    if acts.shape != grads.shape or acts.ndim != 4:
        raise ValueError(f"acts and grads must be (B, C, H, W) alike, got {tuple(acts.shape)}, {tuple(grads.shape)}")
    return (acts * grads).sum(dim=1).abs()


def positions_per_image(channels: int, height: int, width: int, budget: int = 36864) -> int:
    """n = min(budget // C, H*W), at least 1."""
    if budget < 1 or channels < 1:
        raise ValueError(f"budget and channels must be >= 1, got {budget}, {channels}")
    return max(1, min(budget // channels, height * width))


def sample_positions(
    acts: Tensor, scores: Tensor, budget: int = 36864, generator: torch.Generator | None = None
) -> SampledPositions:
    """Draw n positions per image without replacement, weighted by `scores` (B, H, W), from `acts`
    (B, C, H, W). `generator` must live on the scores' device (seed it for reproducible draws);
    None uses torch's global generator. Negative or non-finite scores are an error."""
    if acts.ndim != 4 or scores.shape != (acts.shape[0], *acts.shape[2:]):
        raise ValueError(f"need acts (B, C, H, W) and scores (B, H, W), got {tuple(acts.shape)}, {tuple(scores.shape)}")
    b, c, h, w = acts.shape
    n = positions_per_image(c, h, w, budget)
    flat = scores.detach().reshape(b, h * w).to(torch.float64)
    if not bool(torch.isfinite(flat).all()) or bool((flat < 0).any()):
        raise ValueError("scores must be finite and >= 0")
    total = flat.sum(dim=1, keepdim=True)
    # All-zero rows -> uniform; others -> normalised, with the floor for zero-score positions.
    weights = torch.where(total > 0, flat / total.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    weights = weights.clamp_min(_FLOOR)
    index = torch.multinomial(weights, n, replacement=False, generator=generator)  # (B, n)
    vectors = acts.flatten(2).gather(2, index.unsqueeze(1).expand(b, c, n))  # (B, C, n)
    return SampledPositions(
        vectors=vectors.transpose(1, 2).reshape(b * n, c),
        image=torch.arange(b, device=acts.device).repeat_interleave(n),
        position=index.reshape(-1).to(acts.device),
    )
