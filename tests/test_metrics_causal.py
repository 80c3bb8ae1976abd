"""Causal-fidelity metrics (lib/metrics/causal.py): against scipy per image, and able to fail."""

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from lib.metrics import causal

N, K = 200, 17


@pytest.fixture(scope="module")
def effects() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(N, K))
    present = rng.random((N, K)) < 0.35
    present[:, :3] = True  # at least three present concepts per image
    values[:, 5] = np.round(values[:, 5])  # some ties
    return np.where(present, values, np.nan)


def test_rank_correlations_equal_scipy_per_image(effects):
    rng = np.random.default_rng(1)
    contributions = np.round(rng.normal(size=(N, K)), 1)  # ties on both sides
    contributions[rng.random((N, K)) < 0.1] = np.nan  # some concepts unscored
    rho, tau = causal.spearman(contributions, effects), causal.kendall(contributions, effects)
    for i in range(N):
        both = np.isfinite(contributions[i]) & np.isfinite(effects[i])
        c, e = contributions[i, both], effects[i, both]
        if both.sum() < 2 or np.ptp(c) == 0 or np.ptp(e) == 0:
            assert np.isnan(rho[i]) and np.isnan(tau[i])
            continue
        assert rho[i] == pytest.approx(spearmanr(c, e).statistic, abs=1e-12)
        assert tau[i] == pytest.approx(kendalltau(c, e).statistic, abs=1e-12)  # τ-b


def test_oracle_scores_one_and_random_scores_zero_through_the_same_code(effects):
    oracle = causal.fidelity(effects.copy(), effects)
    assert oracle["spearman"] == pytest.approx(1) and oracle["kendall"] == pytest.approx(1)
    assert oracle["top1"] == 1 and oracle["sign"] == 1 and oracle["absent_share"] == 0 and oracle["coverage"] == 1
    random = causal.fidelity(np.random.default_rng(2).normal(size=(N, K)), effects)
    assert abs(random["spearman"]) < 0.1 and abs(random["kendall"]) < 0.1
    assert random["absent_share"] > 0.4  # a random score spreads over absent concepts too


def test_rho_falls_as_noise_grows(effects):
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(N, K))
    rhos = [causal.fidelity(effects + scale * noise, effects)["spearman"] for scale in (0.0, 0.3, 1.0, 3.0, 30.0)]
    assert all(a > b for a, b in zip(rhos, rhos[1:])), rhos
    assert rhos[0] == pytest.approx(1) and rhos[-1] < 0.15


def test_contribution_moved_onto_an_absent_concept_raises_the_absent_share(effects):
    contributions = np.where(np.isfinite(effects), effects, 0.0)
    base = causal.fidelity(contributions, effects)["absent_share"]
    absent = ~np.isfinite(effects)
    first_absent = absent.argmax(axis=1)
    moved = contributions.copy()
    moved[np.arange(N), first_absent] = np.abs(contributions).max(axis=1)
    assert base == 0 and causal.fidelity(moved, effects)["absent_share"] > 0.2


def test_top1_shares_credit_among_ties_and_sign_counts_agreement():
    effects = np.array([[3.0, 1.0, -1.0, np.nan], [3.0, 1.0, -1.0, np.nan]])
    tied = np.array([[2.0, 2.0, 0.5, 9.0], [0.1, 2.0, 2.0, np.nan]])  # row 0: true top among 2 tied; row 1: not
    np.testing.assert_allclose(causal.top1_agreement(tied, effects), [0.5, 0.0])
    np.testing.assert_allclose(causal.sign_agreement(tied, effects), [2 / 3, 2 / 3])
    np.testing.assert_allclose(causal.absent_share(tied, np.isfinite(effects)), [9 / 13.5, 0.0])
    unscored = np.array([[np.nan, 1.0, np.nan, np.nan], [np.nan] * 4])
    assert causal.coverage(unscored, np.isfinite(effects)) == pytest.approx(1 / 6)
    assert np.isnan(causal.spearman(unscored, effects)).all()  # fewer than two pairs: undefined, not 0
