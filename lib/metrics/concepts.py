"""Per-image summaries of concept contributions (FaCT's statistics), on NumPy blocks of images."""

from __future__ import annotations

import numpy as np

__all__ = ["poscover"]


def poscover(contributions: np.ndarray, fraction: float = 0.8) -> np.ndarray:
    """PosCover: per image (row of (B, J) contributions), the fewest concepts whose positive
    contributions reach `fraction` of the image's total positive contribution (FaCT's
    PosCover-80 at 0.8). float64 (B,); NaN for an image without any positive contribution
    (nothing to cover), so means can leave it out.
    """
    if contributions.ndim != 2:
        raise ValueError(f"contributions must be (B, J), got shape {contributions.shape}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    positive = np.maximum(contributions.astype(np.float64), 0)
    total = positive.sum(axis=1)
    covered = np.cumsum(-np.sort(-positive, axis=1), axis=1)
    # concepts before the running sum first reaches the target, plus the one that reaches it; capped at
    # the positive ones, which round-off could otherwise overshoot when fraction is 1
    needed = np.minimum((covered < fraction * total[:, None]).sum(axis=1) + 1, (positive > 0).sum(axis=1))
    return np.where(total > 0, needed, np.nan)
