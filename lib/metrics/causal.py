"""Causal fidelity (ours ★): does the concept a method credits really move the decision?

Per image, a method's signed contributions c[k] of the concepts to the predicted logit are held
against the concepts' true effects Δ[k] (lib/compare/counterfactual_stage.py: the logit minus the
mean logit of the images with concept k replaced). Δ is NaN for concepts the image does not show;
c is NaN for concepts the method does not score (never 0: an unscored concept is not a zero
contribution). All functions take (N, K) arrays and are vectorised over images.

- `spearman`, `kendall`: rank correlation over the image's present, scored concepts (ties get
  average ranks; Kendall's τ-b), NaN for an image with fewer than two such concepts or a constant
  side; `mean_over_images` averages the finite ones.
- `top1_agreement`: whether the concept credited most is the one whose replacement drops the logit
  most; a tie among the credited top shares the credit (1/ties if the true top is among them).
- `sign_agreement`: share of present, scored concepts whose contribution has the sign of Δ.
- `absent_share`: share of |c| on concepts the image does not show.
- `coverage`: share of present concepts the method scores.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def true_effects(logit: np.ndarray, edit_concept: np.ndarray, edit_logit: np.ndarray, n_concepts: int,
                 keep: np.ndarray | None = None) -> np.ndarray:
    """Δ (N, K, models) = y(x) − the mean counterfactual logit of each concept's edits, NaN where a
    concept has none: logit (N, models); edit_concept (N, E) the concept each edit slot replaced (-1:
    padding); edit_logit (N, E, models); keep (N, E) bool: only these edits (e.g. one tag)."""
    onehot = edit_concept[..., None] == np.arange(n_concepts)  # (N, E, K)
    if keep is not None:
        onehot &= keep[..., None]
    onehot = onehot.astype(np.float32)
    total = np.einsum("bek,bem->bkm", onehot, np.nan_to_num(edit_logit))
    count = onehot.sum(axis=1)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, logit[:, None, :] - total / count, np.nan).astype(np.float32)


def _paired(contributions: np.ndarray, effects: np.ndarray) -> np.ndarray:
    """Where both are defined: the image's present concepts the method scores, bool (N, K)."""
    if contributions.shape != effects.shape or contributions.ndim != 2:
        raise ValueError(f"contributions and effects must both be (N, K); got {contributions.shape} and {effects.shape}")
    return np.isfinite(contributions) & np.isfinite(effects)


def _ranks(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Average ranks per row among the valid entries (NaN elsewhere)."""
    ranked = rankdata(np.where(valid, values, np.nan), axis=1, nan_policy="omit")
    return np.where(valid, ranked, np.nan)


def _row_pearson(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    n = valid.sum(axis=1)
    a, b = np.where(valid, a, 0.0), np.where(valid, b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        da = np.where(valid, a - a.sum(axis=1, keepdims=True) / n[:, None], 0.0)
        db = np.where(valid, b - b.sum(axis=1, keepdims=True) / n[:, None], 0.0)
        r = (da * db).sum(axis=1) / np.sqrt((da**2).sum(axis=1) * (db**2).sum(axis=1))
    return np.where((n >= 2) & np.isfinite(r), r, np.nan)


def spearman(contributions: np.ndarray, effects: np.ndarray) -> np.ndarray:
    """Spearman ρ per image (N,)."""
    valid = _paired(contributions, effects)
    return _row_pearson(_ranks(contributions, valid), _ranks(effects, valid), valid)


def kendall(contributions: np.ndarray, effects: np.ndarray) -> np.ndarray:
    """Kendall τ-b per image (N,), over all pairs of present, scored concepts."""
    valid = _paired(contributions, effects)
    pair = valid[:, :, None] & valid[:, None, :]
    upper = np.triu(np.ones(valid.shape[1:] * 2, bool), k=1)
    pair &= upper
    sc = np.sign(np.nan_to_num(contributions)[:, :, None] - np.nan_to_num(contributions)[:, None, :])
    se = np.sign(np.nan_to_num(effects)[:, :, None] - np.nan_to_num(effects)[:, None, :])
    concordance = (np.where(pair, sc * se, 0)).sum(axis=(1, 2))
    untied_c = (pair & (sc != 0)).sum(axis=(1, 2))
    untied_e = (pair & (se != 0)).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = concordance / np.sqrt(untied_c * untied_e)
    return np.where(np.isfinite(tau), tau, np.nan)


def top1_agreement(contributions: np.ndarray, effects: np.ndarray) -> np.ndarray:
    """Per image (N,): credit of the method's top concept(s) for being the true top (NaN: no pair)."""
    valid = _paired(contributions, effects)
    c = np.where(valid, contributions, -np.inf)
    e = np.where(valid, effects, -np.inf)
    top_c = valid & (c == c.max(axis=1, keepdims=True))
    top_e = valid & (e == e.max(axis=1, keepdims=True))
    hits = (top_c & top_e).any(axis=1)
    credit = np.where(hits, 1.0 / np.maximum(top_c.sum(axis=1), 1), 0.0)
    return np.where(valid.any(axis=1), credit, np.nan)


def sign_agreement(contributions: np.ndarray, effects: np.ndarray) -> np.ndarray:
    """Per image (N,): share of present, scored concepts whose contribution has Δ's sign."""
    valid = _paired(contributions, effects)
    same = np.sign(np.nan_to_num(contributions)) == np.sign(np.nan_to_num(effects))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid.any(axis=1), (same & valid).sum(axis=1) / valid.sum(axis=1), np.nan)


def absent_share(contributions: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per image (N,): Σ|c| over concepts the image does not show / Σ|c| over all scored concepts."""
    magnitude = np.abs(np.nan_to_num(contributions))
    total = magnitude.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (magnitude * ~present).sum(axis=1) / total, np.nan)


def coverage(contributions: np.ndarray, present: np.ndarray) -> float:
    """Share of the (image, present concept) pairs the method scores."""
    return float((np.isfinite(contributions) & present).sum() / max(present.sum(), 1))


def mean_over_images(values: np.ndarray) -> float | None:
    """Mean of the finite per-image values; None when there is none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def fidelity(contributions: np.ndarray, effects: np.ndarray) -> dict[str, float | None]:
    """Every causal-fidelity figure of one method against one model's true effects (N, K each;
    effects NaN exactly where the image does not show the concept)."""
    present = np.isfinite(effects)
    return {
        "spearman": mean_over_images(spearman(contributions, effects)),
        "kendall": mean_over_images(kendall(contributions, effects)),
        "top1": mean_over_images(top1_agreement(contributions, effects)),
        "sign": mean_over_images(sign_agreement(contributions, effects)),
        "absent_share": mean_over_images(absent_share(contributions, present)),
        "coverage": coverage(contributions, present),
    }
