"""The sparse stage's work: the c* store, the elastic-net final layer and SALF-CBM's test metrics."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from rich.progress import Progress

from lib.core.distributed import Ranks, sharded_outputs
from lib.core.extract import fill_stores
from lib.core.layout import Layout
from lib.core.outputs import write_csv, write_figure, write_json
from lib.core.params import Params, SparseParams, params_hash
from lib.core.progress import progress_callback
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.core.streams import batch_source
from lib.data.manifest import read_dataset_info
from lib.methods.salf.artifacts import load_bottleneck, save_classifier
from lib.methods.salf.classifier import ConceptClassifier
from lib.methods.salf.data import glm_batches, splits_of
from lib.methods.salf.figures import path_figure
from lib.methods.salf.glm import Data, evaluate_accuracy, fit_dense, fit_elastic_net_path, select_lambda
from lib.methods.salf.metrics import rule_recovery, stored_accuracy
from lib.methods.salf.model import ConceptBottleneck
from lib.methods.salf.pooling import Standardiser, pool_concepts

__all__ = ["SparseReport", "run_sparse"]


def _write_activations(
    layout: Layout, bottleneck: ConceptBottleneck, layer: str, pooling: str, device: torch.device, progress: Progress | None
) -> None:
    """The c* store: pooled (not standardised) concept activations (N, M) of every image.

    The lambda path makes hundreds of passes over c*; reading it from this small store instead of
    recomputing it from the features keeps each pass cheap at any N. Its fingerprint is the
    bottleneck's weights, the pooling and the feature store's fingerprint, so a retrained
    bottleneck or new features rebuild it.
    """
    feature_store = open_store(layout.features(layer))
    features = feature_store["features"]
    n, rows = features.shape[0], (features.shards or features.chunks)[0]
    weight = bottleneck.conv.weight.detach().cpu().numpy()
    fingerprint = params_hash(
        pooling, layer, hashlib.sha256(weight.tobytes()).hexdigest(), feature_store.attrs["fingerprint"]
    )
    spec = ArraySpec("activations", (n, bottleneck.conv.out_channels), "float32", ("item", "concept"))

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        attributes = {"stage": "sparse", "params_hash": fingerprint, "layer": layer, "pooling": pooling}
        return {"c": ShardedWriter(layout.salf_activations, [spec], rows, attributes, fingerprint, create=create)}

    def encode(block: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        return {"c": {"activations": pool_concepts(bottleneck(block), pooling)}}

    with sharded_outputs(make_writers, Ranks()) as writers:
        fill_stores(writers, features, encode, batch_size=rows, device=device, progress=progress, description="c*")


def _glm_data(
    activations: zarr.Array,
    labels: zarr.Array,
    rows: np.ndarray,
    shuffle: bool = False,
    *,
    standardiser: Standardiser,
    params: SparseParams,
    device: torch.device,
) -> Data:
    """A split's (standardised c*, labels) for lib.methods.salf.glm: tensors on the device when they fit
    in sparse.in_memory_mb (hundreds of SAGA epochs then never touch the disk), else a stream
    re-read from the c* store every epoch."""
    stream = partial(
        glm_batches, activations, labels, rows, standardiser, params.batch_size, seed=params.seed, device=device
    )
    if len(rows) * activations.shape[1] * 4 > params.in_memory_mb * 2**20:
        return stream(shuffle=shuffle)
    x, y, _ = (torch.cat(parts) for parts in zip(*stream()()))
    return x, y


@dataclass(frozen=True)
class SparseReport:
    metrics: dict
    n_lambdas: int
    selected_lambda: float
    metrics_path: Path

    def summary(self) -> str:
        m = self.metrics
        recovery = "" if m["rule_recovery"] is None else f", rule recovery {m['rule_recovery']:.2f}"
        return (
            f"test accuracy sparse {m['acc_sparse']:.3f} ({m['nonzero_per_class']:.1f} weights/class, lambda "
            f"{self.selected_lambda:.2e}), dense {m['acc_dense']:.3f}, backbone {m['acc_backbone']:.3f}{recovery} "
            f"-> {self.metrics_path}"
        )


def run_sparse(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> SparseReport:
    """Pool and standardise the concept maps, fit the elastic-net path, pick lambda by val accuracy
    within sparse.target_nonzeros_per_class, fit the dense comparison layer and score all on test.

    Writes the c* store, the classifier, metrics/salf.json and the path plot data.
    """
    params = config.sparse
    info = read_dataset_info(layout.dataset_info)
    classes = list(info["classes"])
    splits = splits_of(config, layout)
    bottleneck, meta = load_bottleneck(layout.salf_bottleneck, device)
    _write_activations(layout, bottleneck, meta["layer"], params.pooling, device, progress)
    activations = open_store(layout.salf_activations)["activations"]
    labels = open_store(layout.images)["labels"]
    train_blocks = batch_source({"activations": activations}, splits.train, params.batch_size, device=device)
    standardiser = Standardiser.fit(block["activations"] for block in train_blocks())
    split_data = partial(_glm_data, activations, labels, standardiser=standardiser, params=params, device=device)
    train, val, test = split_data(splits.train, shuffle=True), split_data(splits.val), split_data(splits.test)
    fit = dict(batch_size=params.batch_size, max_epochs=params.max_epochs, tol=params.tol, seed=params.seed, device=device)
    path = fit_elastic_net_path(
        train, val, n_classes=len(classes), alpha=params.alpha, n_lambdas=params.n_lambdas,
        lambda_min_ratio=params.lambda_min_ratio, max_nonzeros_per_class=params.target_nonzeros_per_class,
        progress=progress_callback(progress, "lambda path", params.n_lambdas, "val_acc"), **fit,
    )
    selected = select_lambda(path, params.target_nonzeros_per_class)
    weight, bias = path.weight(selected).to(device), path.biases[selected].to(device)
    dense = fit_dense(train, n_classes=len(classes), lam=params.dense_lambda, **fit)
    names = tuple(c["name"] for c in meta["concepts"])
    recovery = rule_recovery(weight, names, info)
    metrics = {
        "acc_backbone": stored_accuracy(open_store(layout.logits)["logits"], labels, splits.test),
        "acc_sparse": evaluate_accuracy(weight, bias, test),
        "acc_dense": evaluate_accuracy(*dense, test),
        "nonzero_per_class": float(path.nonzeros_per_class[selected]),
        "rule_recovery": None if recovery is None else recovery[0],
        "rule_recovery_per_class": None if recovery is None else recovery[1],
        "val_acc_sparse": float(path.val_acc[selected]),
        "lambda": float(path.lambdas[selected]),
        "n_concepts": len(names),
    }
    classifier = ConceptClassifier(params.pooling, standardiser.to("cpu"), weight.cpu(), bias.cpu(), names, tuple(classes))
    provenance = {"stage": "sparse", "params_hash": params_hash(config.sparse, meta["provenance"]["params_hash"])}
    save_classifier(layout.salf_classifier, classifier, dense, path.summary(), selected, provenance)
    write_json(layout.salf_metrics, metrics)
    write_csv(layout.salf_plot("path"), pd.DataFrame(path.summary()))
    write_figure(layout.salf_figure("path"), path_figure(path, selected))
    return SparseReport(metrics, len(path.lambdas), float(path.lambdas[selected]), layout.salf_metrics)
