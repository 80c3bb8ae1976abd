"""Our GLM-SAGA (lib/methods/salf/glm.py, sparse.step_size: 0.1) against the `glm-saga` package, LF-CBM's solver.

    .venv/bin/python -m benchmarks.glm [--n 3000] [--concepts 600] [--classes 60] [--epochs 80]

One synthetic problem (N standardised samples of M concepts, K classes drawn from a sparse softmax
model) and one fixed sequence of shuffled minibatch orders, fed to both: to ours through a batch
source, to glm-saga through a loader whose every pass yields the next order. glm-saga is called
as LF-CBM's train_cbm.py calls it (`glm_saga(linear, loader, 0.1, epochs, 0.99, epsilon=1, k=1,
do_zero=False, metadata={max_reg: lam * alpha})`, zero-initialised linear layer), except tol=0 so
that neither solver stops before the last epoch. Both run on one CPU thread.

Printed: the largest weight and bias differences after 2 epochs; after `--epochs` epochs the
elastic-net objective of each (mean CE + lam alpha |W|_1 + lam (1 - alpha) / 2 |W|^2, float64 over
the whole training set), their relative difference and how many weights are non-zero in one and
zero in the other; both objectives against scikit-learn's SAGA run towards convergence (C = 1 / (N lam),
l1_ratio = alpha; --sklearn-tol, --sklearn-max-iter) and against ours with the automatic step run to
convergence; the wall time of each solver. The last line: `speed_vs_glm_saga=… max_weight_diff=…`
(speed: glm-saga's seconds / ours; the weight difference after 2 epochs), then the other figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import time
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lib.methods.salf.glm import fit_elastic_net_path


def make_problem(n: int, m: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """Standardised X (n, m) float32 and balanced labels (n,): each class shifts 5 random concepts by
    +-1 (class-specific), the rest is unit Gaussian noise, so the classes overlap."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    shift = torch.zeros(k, m, dtype=torch.float64)
    for c in range(k):
        shift[c, torch.randperm(m, generator=g)[:5]] = torch.randn(5, generator=g, dtype=torch.float64).sign()
    x = torch.randn(n, m, generator=g, dtype=torch.float64) + shift[y]
    x = (x - x.mean(dim=0)) / x.std(dim=0)
    return x.float(), y


class OrderLoader:
    """glm-saga's loader: pass e yields (X, y, idx) minibatches in orders[e] (the last order once they run out)."""

    def __init__(self, x: Tensor, y: Tensor, orders: list[Tensor], batch: int) -> None:
        self.x, self.y, self.orders, self.batch, self.passes = x, y, orders, batch, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self.orders[min(self.passes, len(self.orders) - 1)]
        self.passes += 1
        for idx in order.split(self.batch):
            yield self.x[idx], self.y[idx], idx


def ours(x: Tensor, y: Tensor, orders: list[Tensor], batch: int, epochs: int, lam: float, alpha: float,
         k: int) -> tuple[Tensor, Tensor, float]:
    """(W, b, seconds) of fit_elastic_net_path with step 0.1 on the fixed orders (its first pass
    only gathers statistics, so it reads orders[0] too)."""
    calls = [0]

    def source() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = orders[max(calls[0] - 1, 0)]
        calls[0] += 1
        for idx in order.split(batch):
            yield x[idx], y[idx], idx

    began = time.perf_counter()
    path = fit_elastic_net_path(source, (x, y), n_classes=k, alpha=alpha, lambdas=[lam], step_size=0.1,
                                max_epochs=epochs, tol=1e-30, batch_size=batch)
    return path.weight(0), path.biases[0], time.perf_counter() - began


def glm_saga_package(x: Tensor, y: Tensor, orders: list[Tensor], batch: int, epochs: int, lam: float, alpha: float,
                     k: int) -> tuple[Tensor, Tensor, float]:
    """(W, b, seconds) of the glm-saga package called as LF-CBM calls it (module doc)."""
    from glm_saga.elasticnet import glm_saga

    linear = torch.nn.Linear(x.shape[1], k)
    linear.weight.data.zero_()
    linear.bias.data.zero_()
    loader = OrderLoader(x, y, orders, batch)
    began = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # its implicit-dim softmax warning
        glm_saga(linear, loader, 0.1, epochs, alpha, epsilon=1, k=1, do_zero=False, tol=0.0,
                 metadata={"max_reg": {"nongrouped": lam * alpha}}, n_ex=len(x), n_classes=k)
    return linear.weight.detach().clone(), linear.bias.detach().clone(), time.perf_counter() - began


def objective(w: Tensor, b: Tensor, x: Tensor, y: Tensor, lam: float, alpha: float) -> float:
    """The elastic-net objective in float64 over all of (x, y)."""
    w, b = w.double(), b.double()
    ce = F.cross_entropy(x.double() @ w.T + b, y)
    return float(ce + lam * alpha * w.abs().sum() + lam * (1 - alpha) / 2 * w.square().sum())


def sklearn_optimum(x: Tensor, y: Tensor, lam: float, alpha: float, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int]:
    """scikit-learn's SAGA on the same objective (C = 1 / (N lam), l1_ratio = alpha): (W, b, epochs run)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(solver="saga", C=1 / (len(x) * lam), l1_ratio=alpha, tol=tol, max_iter=max_iter)
        model.fit(x.double().numpy(), y.numpy())
    return torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_), int(model.n_iter_.max())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="N: training samples")
    parser.add_argument("--concepts", type=int, default=600, help="M")
    parser.add_argument("--classes", type=int, default=60, help="K")
    parser.add_argument("--epochs", type=int, default=80, help="LF-CBM's ImageNet n_iters")
    parser.add_argument("--batch", type=int, default=256, help="LF-CBM's saga_batch_size")
    parser.add_argument("--lam", type=float, default=1e-3 / 0.99, help="the objective's lambda (LF-CBM's --lam / alpha)")
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sklearn-tol", type=float, default=1e-6)
    parser.add_argument("--sklearn-max-iter", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x, y = make_problem(args.n, args.concepts, args.classes, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    orders = [torch.randperm(args.n, generator=g) for _ in range(args.epochs)]
    # glm_saga's lambda: float32 logspace of max_reg / alpha (one point); ours gets that same number
    lam = float(torch.logspace(math.log10(args.lam), math.log10(args.lam), 1)[0])
    solve = (args.lam, args.alpha, args.classes)
    w2, b2, _ = ours(x, y, orders, args.batch, 2, lam, args.alpha, args.classes)
    g2, c2, _ = glm_saga_package(x, y, orders, args.batch, 2, lam, args.alpha, args.classes)
    diff2 = float((w2 - g2).abs().max())
    bias2 = float((b2 - c2).abs().max())
    print(f"after 2 epochs: max |W_ours - W_glm_saga| = {diff2:.2e}, max |b diff| = {bias2:.2e}", flush=True)
    w, b, t_ours = ours(x, y, orders, args.batch, args.epochs, lam, args.alpha, args.classes)
    gw, gb, t_glm = glm_saga_package(x, y, orders, args.batch, args.epochs, lam, args.alpha, args.classes)
    f_ours, f_glm = objective(w, b, x, y, *solve[:2]), objective(gw, gb, x, y, *solve[:2])
    support = int(((w != 0) != (gw != 0)).sum())
    print(f"after {args.epochs} epochs: objective ours {f_ours:.8f} glm-saga {f_glm:.8f} (rel diff "
          f"{abs(f_ours - f_glm) / abs(f_glm):.2e}); non-zeros ours {int((w != 0).sum())} glm-saga {int((gw != 0).sum())}, "
          f"{support} differ; max |W diff| {float((w - gw).abs().max()):.2e}", flush=True)
    print(f"time {args.epochs} epochs: ours {t_ours:.2f} s, glm-saga {t_glm:.2f} s ({t_glm / t_ours:.2f}x)", flush=True)
    sw, sb, sk_epochs = sklearn_optimum(x, y, *solve[:2], args.sklearn_tol, args.sklearn_max_iter)
    f_sk = objective(sw, sb, x, y, *solve[:2])
    print(f"scikit-learn saga (tol {args.sklearn_tol:g}, {sk_epochs} of at most {args.sklearn_max_iter} epochs): objective "
          f"{f_sk:.8f}, non-zeros {int((sw != 0).sum())}; gap ours {(f_ours - f_sk) / f_sk:.2e}, glm-saga "
          f"{(f_glm - f_sk) / f_sk:.2e}", flush=True)
    path = fit_elastic_net_path((x, y), (x, y), n_classes=args.classes, alpha=args.alpha, lambdas=[lam], tol=1e-7,
                                max_epochs=args.sklearn_max_iter, batch_size=args.batch)
    f_auto = objective(path.weight(0), path.biases[0], x, y, *solve[:2])
    print(f"ours, automatic step, to tol 1e-7 ({int(path.epochs[0])} epochs, converged {bool(path.converged[0])}): objective "
          f"{f_auto:.8f} (vs scikit-learn {(f_auto - f_sk) / f_sk:.2e}), non-zeros {int(path.nonzeros[0])}", flush=True)
    values = {
        "speed_vs_glm_saga": t_glm / t_ours, "max_weight_diff": diff2, "max_bias_diff": bias2,
        "objective_rel_diff": abs(f_ours - f_glm) / abs(f_glm), "support_diff": support,
        "gap_ours_vs_sklearn": (f_ours - f_sk) / f_sk, "gap_glm_saga_vs_sklearn": (f_glm - f_sk) / f_sk,
        "gap_converged_vs_sklearn": (f_auto - f_sk) / f_sk,
        "nonzero_per_class": float((w != 0).sum()) / args.classes,
    }
    print(" ".join(f"{key}={value:.4g}" for key, value in values.items()))
    return values


if __name__ == "__main__":
    main()
