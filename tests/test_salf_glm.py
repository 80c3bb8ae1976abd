"""SALF-CBM final layer: pooling, standardisation, elastic-net path (vs scikit-learn), selection."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from lib.methods.salf.glm import ElasticNetPath, evaluate_accuracy, fit_dense, fit_elastic_net_path, select_lambda
from lib.methods.salf.pooling import Standardiser, pool_concepts

# Float32 SAGA stopped at tol=1e-6 against float64 sklearn SAGA at tol=1e-10: measured max |dW|
# is ~4e-5 on this problem (weights of order 1); the documented tolerance is 2e-4.
WEIGHT_ATOL = 2e-4


@pytest.fixture(scope="module")
def problem():
    """Standardised (X, y): 3 classes driven by features 0-2, features 3-7 irrelevant."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    true_w = torch.zeros(3, 8, dtype=torch.float64)
    true_w[0, 0], true_w[1, 1], true_w[2, 2], true_w[2, 0] = 2.0, -2.0, 1.5, -1.0
    probs = (x @ true_w.T).softmax(dim=1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    x = (x - x.mean(dim=0)) / x.std(dim=0, unbiased=False)
    return x.float(), y


def sklearn_fit(x, y, lam, alpha):
    """The same objective in scikit-learn's parameterisation: C = 1 / (n lam), l1_ratio = alpha."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(solver="saga", C=1 / (x.shape[0] * lam), l1_ratio=alpha, tol=1e-10, max_iter=100_000)
        model.fit(x.double().numpy(), y.numpy())
    return model.coef_, model.intercept_


# ----------------------------------------------------------------------------- pooling
def test_pooling_known_answers():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    assert pool_concepts(maps, "avg").item() == pytest.approx(1.5)
    assert pool_concepts(maps, "max").item() == pytest.approx(3.0)
    weights = np.exp([0.0, 1.0, 2.0, 3.0]) / np.exp([0.0, 1.0, 2.0, 3.0]).sum()
    assert pool_concepts(maps, "softmax").item() == pytest.approx(float((weights * [0, 1, 2, 3]).sum()), abs=1e-6)
    with pytest.raises(ValueError, match="'median'"):
        pool_concepts(maps, "median")
    with pytest.raises(ValueError, match=r"\(B, M, G, G\)"):
        pool_concepts(maps[0], "avg")


def test_standardiser_streams_exact_population_statistics():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(50, 3, generator=g, dtype=torch.float64) + torch.tensor([1e6, 0.0, -3.0], dtype=torch.float64)
    data[:, 2] = -3.0  # zero variance
    stats = Standardiser.fit(data.float().split(7))
    assert stats.mean[:2].tolist() == pytest.approx(data.float().double().mean(dim=0)[:2].tolist(), rel=1e-7)
    assert float(stats.std[1]) == pytest.approx(float(data[:, 1].float().double().std(unbiased=False)), rel=1e-5)
    assert float(stats.std[2]) == 1.0  # a constant concept maps to 0, not NaN
    out = stats(data[:, :].float())
    assert torch.isfinite(out).all() and torch.equal(out[:, 2], torch.zeros(50))
    with pytest.raises(ValueError, match="empty"):
        Standardiser.fit([])


# ----------------------------------------------------------------------------- elastic net
@pytest.mark.parametrize("alpha", [0.5, 0.99])
def test_path_matches_sklearn_saga(problem, alpha):
    x, y = problem
    path = fit_elastic_net_path(
        (x, y), (x, y), n_classes=3, alpha=alpha, n_lambdas=6, lambda_min_ratio=0.01, batch_size=50,
        tol=1e-6, max_epochs=5000,
    )
    assert bool(path.converged.all())
    assert path.nonzeros[0] == 0 and path.nonzeros[-1] > path.nonzeros[2] > 0  # a real sparsity range
    for i in range(1, len(path.lambdas)):  # entry 0 sits exactly on the lam_max boundary
        coef, intercept = sklearn_fit(x, y, float(path.lambdas[i]), alpha)
        ours = path.weight(i).double().numpy()
        np.testing.assert_array_equal(ours != 0, coef != 0)
        np.testing.assert_allclose(ours, coef, atol=WEIGHT_ATOL, rtol=0)
        # Only bias differences are identified (softmax is shift-invariant, bias unpenalised).
        bias = path.biases[i].double().numpy()
        np.testing.assert_allclose(bias - bias.mean(), intercept - intercept.mean(), atol=WEIGHT_ATOL, rtol=0)


def test_one_fixed_lambda_from_zero_matches_sklearn(problem):
    """sparse.lam: one lambda fitted alone from W = 0 (LF-CBM's glm_saga with k=1), not warm-started."""
    x, y = problem
    lam = 0.02
    path = fit_elastic_net_path((x, y), (x, y), n_classes=3, alpha=0.99, lambdas=[lam], batch_size=50, tol=1e-6, max_epochs=5000)
    assert path.lambdas.tolist() == [lam] and bool(path.converged.all()) and 0 < int(path.nonzeros[0]) < 24
    coef, _ = sklearn_fit(x, y, lam, 0.99)
    np.testing.assert_allclose(path.weight(0).double().numpy(), coef, atol=WEIGHT_ATOL, rtol=0)
    with pytest.raises(ValueError, match="lambdas must be a non-empty list of positive values"):
        fit_elastic_net_path((x, y), (x, y), n_classes=3, lambdas=[0.0])


def _glm_saga_reference(x, y, order, epochs, step, lam, alpha, n_classes):
    """The glm-saga package's train_saga update (LF-CBM's final layer), written out in numpy:
    W, b, the (n, K) table a and its means start at zero; per minibatch B of the fixed `order`:

        a_new  = softmax(x W^T + b) - onehot(y)        (at the current W, b)
        g_W    = mean_B (a_new - a_old) x^T + mean_W;   g_b = mean_B (a_new - a_old) + mean_b
        W      = soft_threshold(W - step g_W, step lam alpha) / (1 + step lam (1 - alpha))
        b      = b - step g_b                          (bias unpenalised)
        mean_W += sum_B (a_new - a_old) x^T / n;  mean_b += sum_B (a_new - a_old) / n;  a[B] = a_new
    """
    n, m = x.shape
    w, b = np.zeros((n_classes, m)), np.zeros(n_classes)
    table, mean_w, mean_b = np.zeros((n, n_classes)), np.zeros((n_classes, m)), np.zeros(n_classes)
    for _ in range(epochs):
        for idx in order:
            xb, yb = x[idx], y[idx]
            logits = xb @ w.T + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            a_new = p / p.sum(axis=1, keepdims=True) - np.eye(n_classes)[yb]
            diff = a_new - table[idx]
            g_w = diff.T @ xb / len(idx) + mean_w
            g_b = diff.mean(axis=0) + mean_b
            z = w - step * g_w
            w = np.sign(z) * np.maximum(np.abs(z) - step * lam * alpha, 0) / (1 + step * lam * (1 - alpha))
            b = b - step * g_b
            mean_w, mean_b = mean_w + diff.T @ xb / n, mean_b + diff.sum(axis=0) / n
            table[idx] = a_new
    return w, b


def test_fixed_step_is_glm_sagas_update_worked_by_hand():
    """sparse.step_size: 0.1 runs LF-CBM's GLM-SAGA (zero W, b, table and means; its proximal step):
    after the 2 steps of epoch 1 (empty table) and the 4 of epoch 2 (table read back) the weights
    equal the written-out update; the automatic start (prior bias, full table) gives others."""
    x = np.array([[1.0, -0.5, 2.0], [0.3, 1.2, -1.0], [-1.5, 0.4, 0.2], [0.8, -2.0, 0.5]])
    y = np.array([0, 1, 2, 1])
    order = [np.array([2, 0]), np.array([1, 3])]
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    def source():
        for idx in order:
            yield xt[idx], yt[idx], torch.tensor(idx)

    step, lam, alpha = 0.1, 0.5, 0.9
    for epochs in (1, 2):
        path = fit_elastic_net_path(source, (xt, yt), n_classes=3, alpha=alpha, lambdas=[lam], step_size=step,
                                    max_epochs=epochs, tol=1e-12)
        w, b = _glm_saga_reference(x, y, order, epochs, step, lam, alpha, 3)
        assert (w == 0).any() and (w != 0).any()  # the soft threshold acts on some weights, not all
        np.testing.assert_allclose(path.weight(0).numpy(), w, atol=1e-6, rtol=0)
        np.testing.assert_allclose(path.biases[0].numpy(), b, atol=1e-6, rtol=0)
        assert path.step_size == step
    auto = fit_elastic_net_path(source, (xt, yt), n_classes=3, alpha=alpha, lambdas=[lam], max_epochs=2, tol=1e-12)
    assert np.abs(auto.biases[0].numpy() - b).max() > 1e-2


def test_lambda_max_is_the_exact_sparsity_boundary(problem):
    x, y = problem
    alpha = 0.9
    onehot = torch.nn.functional.one_hot(y, 3).double()
    expected = (x.double().T @ (onehot - onehot.mean(dim=0))).abs().max() / x.shape[0] / alpha
    path = fit_elastic_net_path((x, y), (x, y), n_classes=3, alpha=alpha, n_lambdas=2, lambda_min_ratio=0.98, tol=1e-6)
    assert float(path.lambdas[0]) == pytest.approx(float(expected), rel=1e-5)
    assert path.nonzeros.tolist()[0] == 0 and path.nonzeros.tolist()[1] > 0
    # At lam_max the bias alone fits the class prior.
    prior = onehot.mean(dim=0)
    torch.testing.assert_close(path.biases[0].double().softmax(dim=0), prior, atol=1e-5, rtol=0)


def test_streamed_source_gives_the_same_solution(problem):
    x, y = problem
    order = torch.randperm(300, generator=torch.Generator().manual_seed(3))

    def source():  # e.g. shards of a store, each batch carrying its rows' indices
        for idx in order.split(64):
            yield x[idx].half(), y[idx], idx

    kwargs = dict(n_classes=3, alpha=0.99, n_lambdas=4, lambda_min_ratio=0.05, tol=1e-6, max_epochs=5000)
    streamed = fit_elastic_net_path(source, source, **kwargs)
    in_memory = fit_elastic_net_path((x.half().float(), y), (x, y), batch_size=64, **kwargs)
    torch.testing.assert_close(streamed.weights.to_dense(), in_memory.weights.to_dense(), atol=WEIGHT_ATOL, rtol=0)
    assert streamed.val_acc.tolist() == in_memory.val_acc.tolist()


def test_max_nonzeros_stops_the_path_early(problem):
    x, y = problem
    seen = []
    path = fit_elastic_net_path(
        (x, y), (x, y), n_classes=3, n_lambdas=20, lambda_min_ratio=1e-3, max_nonzeros_per_class=1.0,
        progress=lambda i, metrics: seen.append(metrics["nonzeros_per_class"]),
    )
    assert len(path.lambdas) < 20
    assert float(path.nonzeros_per_class[-1]) > 1.0 and float(path.nonzeros_per_class[-2]) <= 1.0
    assert seen == path.nonzeros_per_class.tolist()
    assert path.weights.shape == (len(path.lambdas), 3, 8) and path.weights.is_sparse


def test_path_stops_at_the_first_perfect_val_accuracy():
    """Denser entries after a perfect one can only tie it, and ties go to the sparser entry."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes, separable by features 0 and 1
    x[:, 0] += torch.where(x[:, 0] > 0, 1.0, -1.0)  # a margin
    x[:, 1] += torch.where(x[:, 1] > 0, 1.0, -1.0)
    path = fit_elastic_net_path((x, y), (x, y), n_classes=4, n_lambdas=30, lambda_min_ratio=1e-3, tol=1e-5)
    assert len(path.lambdas) < 30
    assert float(path.val_acc[-1]) == 1.0 and bool((path.val_acc[:-1] < 1.0).all())
    assert select_lambda(path, target_nonzeros_per_class=6) == len(path.lambdas) - 1


def test_fit_dense_matches_sklearn_l2(problem):
    x, y = problem
    lam = 1e-2
    weight, bias = fit_dense((x, y), n_classes=3, lam=lam, batch_size=50, tol=1e-6, max_epochs=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = LogisticRegression(C=1 / (300 * lam), l1_ratio=0.0, tol=1e-10, max_iter=10_000)
        reference.fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(weight.double().numpy(), reference.coef_, atol=WEIGHT_ATOL, rtol=0)
    assert (weight != 0).all()
    assert evaluate_accuracy(weight, bias, (x, y)) == pytest.approx(reference.score(x.double().numpy(), y.numpy()))


def test_bad_inputs_raise(problem):
    x, y = problem
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        fit_elastic_net_path((x, y), (x, y), n_classes=3, alpha=0.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_elastic_net_path((x, y), (x, y), n_classes=2)
    with pytest.raises(ValueError, match="permutation"):
        fit_elastic_net_path(lambda: iter([(x, y, torch.zeros(300, dtype=torch.long))]), (x, y), n_classes=3)
    with pytest.raises(ValueError, match=r"classes \[3\] have no training samples"):
        fit_elastic_net_path((x, y), (x, y), n_classes=4)
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_elastic_net_path((x.masked_fill(x > 3, float("nan")), y), (x, y), n_classes=3)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        fit_dense((x, y), n_classes=3, step_size=0.0)


def _path(nonzeros, val_acc):
    count = len(nonzeros)
    return ElasticNetPath(
        lambdas=torch.ones(count, dtype=torch.float64), weights=torch.zeros(count, 2, 4).to_sparse(),
        biases=torch.zeros(count, 2), nonzeros=torch.tensor(nonzeros),
        val_acc=torch.tensor(val_acc, dtype=torch.float64),
        train_loss=torch.zeros(count, dtype=torch.float64), epochs=torch.ones(count, dtype=torch.int64),
        converged=torch.ones(count, dtype=torch.bool), alpha=0.99, step_size=0.1,
    )


def test_select_lambda_best_accuracy_within_budget():
    path = _path([0, 2, 4, 6, 8], [0.3, 0.7, 0.7, 0.8, 0.9])  # per class: 0, 1, 2, 3, 4
    assert select_lambda(path, 3.0) == 3
    assert select_lambda(path, 2.5) == 1  # tie between 1 and 2 goes to the sparser
    assert select_lambda(path, 10) == 4
    with pytest.raises(ValueError, match="no path entry has <= 0.5"):
        select_lambda(_path([2, 4], [0.5, 0.6]), 0.5)
    assert path.summary()[3] == {
        "lambda": 1.0, "nonzeros_per_class": 3.0, "val_acc": 0.8, "train_loss": 0.0, "epochs": 1, "converged": True
    }
