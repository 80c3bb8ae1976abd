"""The final layers on top of any per-image activations: SALF-CBM's c* and its Table 1 baselines'.

One recipe for all of them (sparse params): standardise with train statistics, fit the elastic net
(the lambda path with selection by val accuracy, or one fixed lambda) and a dense L2 layer, score
both on test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import zarr
from rich.progress import Progress
from torch import Tensor

from lib.core.params import SparseParams
from lib.core.progress import progress_callback
from lib.core.streams import batch_source
from lib.methods.salf.data import Splits, glm_batches
from lib.methods.salf.glm import Data, ElasticNetPath, evaluate_accuracy, fit_dense, fit_elastic_net_path, select_lambda
from lib.methods.salf.pooling import Standardiser

__all__ = ["FinalLayers", "fit_final_layers"]


@dataclass(frozen=True)
class FinalLayers:
    """Fitted final layers and their test accuracies."""

    standardiser: Standardiser  # train mean/std of the activations
    path: ElasticNetPath  # the lambda path (one entry with a fixed lambda)
    selected: int  # the chosen entry
    weight: Tensor  # (K, M) the selected sparse layer
    bias: Tensor  # (K,)
    dense: tuple[Tensor, Tensor] | None  # the dense (L2) layer, if fitted
    acc_sparse: float
    acc_dense: float | None

    @property
    def nonzero_per_class(self) -> float:
        return float(self.path.nonzeros_per_class[self.selected])

    @property
    def lam(self) -> float:
        return float(self.path.lambdas[self.selected])


def _glm_data(
    activations: zarr.Array,
    labels: zarr.Array,
    rows: np.ndarray,
    shuffle: bool = False,
    *,
    standardiser: Standardiser,
    transform: Callable[[Tensor], Tensor] | None,
    params: SparseParams,
    device: torch.device,
) -> Data:
    """A split's (standardised activations, labels) for lib.methods.salf.glm: tensors on the device
    when they fit in sparse.in_memory_mb (hundreds of SAGA epochs then never touch the disk), else a
    stream re-read from the store every epoch."""
    stream = partial(
        glm_batches, activations, labels, rows, standardiser, params.batch_size,
        transform=transform, seed=params.seed, device=device,
    )
    if len(rows) * standardiser.mean.shape[0] * 4 > params.in_memory_mb * 2**20:
        return stream(shuffle=shuffle)
    # filled in place: concatenating the blocks would hold the split twice (ImageNet's c*: 2 x 23 GB)
    x = torch.empty(len(rows), standardiser.mean.shape[0], device=device)
    y = torch.empty(len(rows), dtype=torch.int64, device=device)
    for values, labels_, position in stream()():
        x[position], y[position] = values, labels_
    return x, y


def fit_final_layers(
    activations: zarr.Array,
    labels: zarr.Array,
    splits: Splits,
    n_classes: int,
    params: SparseParams,
    device: torch.device,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    dense: bool = True,
    progress: Progress | None = None,
    description: str = "lambda path",
) -> FinalLayers:
    """Fit the sparse (and with `dense` the dense) final layer on the store's rows of `splits`
    (train fits, val picks lambda, test scores). `transform` maps a block of `activations` to the layer's inputs (default:
    they are its inputs), applied on the device as the blocks stream."""
    train_blocks = batch_source({"activations": activations}, splits.train, params.batch_size, device=device)
    standardiser = Standardiser.fit(
        block["activations"] if transform is None else transform(block["activations"]) for block in train_blocks()
    )
    split_data = partial(_glm_data, activations, labels, standardiser=standardiser, transform=transform, params=params, device=device)
    train, val, test = split_data(splits.train, shuffle=True), split_data(splits.val), split_data(splits.test)
    step_size = None if params.step_size == "auto" else params.step_size
    fit = dict(
        batch_size=params.batch_size, step_size=step_size, max_epochs=params.max_epochs, tol=params.tol, seed=params.seed,
        device=device,
    )
    if params.lam is None:
        path = fit_elastic_net_path(
            train, val, n_classes=n_classes, alpha=params.alpha, n_lambdas=params.n_lambdas,
            lambda_min_ratio=params.lambda_min_ratio, max_nonzeros_per_class=params.target_nonzeros_per_class,
            progress=progress_callback(progress, description, params.n_lambdas, "val_acc"), **fit,
        )
        selected = select_lambda(path, params.target_nonzeros_per_class)
    else:  # one lambda from W = 0, as LF-CBM's glm_saga(k=1) (whose lambda is its --lam / alpha: docs)
        path = fit_elastic_net_path(
            train, val, n_classes=n_classes, alpha=params.alpha, lambdas=[params.lam],
            progress=progress_callback(progress, description, 1, "val_acc"), **fit,
        )
        selected = 0
    weight, bias = path.weight(selected).to(device), path.biases[selected].to(device)
    dense_layer = fit_dense(train, n_classes=n_classes, lam=params.dense_lambda, **fit) if dense else None
    return FinalLayers(
        standardiser=standardiser.to("cpu"),
        path=path,
        selected=selected,
        weight=weight,
        bias=bias,
        dense=dense_layer,
        acc_sparse=evaluate_accuracy(weight, bias, test),
        acc_dense=None if dense_layer is None else evaluate_accuracy(*dense_layer, test),
    )
