"""The cbl and sparse stages' work: train the concept bottleneck, then the sparse final layer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
import zarr
from rich.progress import Progress

from lib.concept_store import read_concepts
from lib.data.manifest import read_dataset_info
from lib.distributed import Ranks, sharded_outputs
from lib.extract import fill_stores
from lib.layout import Layout
from lib.outputs import write_csv, write_figure, write_json
from lib.params import Params, SparseParams, params_hash
from lib.salf.artifacts import load_bottleneck, save_bottleneck, save_classifier
from lib.salf.cbl import ConceptBottleneck, concept_scores, filter_concepts, train_bottleneck
from lib.salf.data import glm_batches, pair_batches, similarity_target, splits_of
from lib.salf.explain import ConceptClassifier
from lib.salf.figures import loss_curve_figure, path_figure
from lib.salf.glm import Data, evaluate_accuracy, fit_dense, fit_elastic_net_path, select_lambda
from lib.salf.metrics import rule_recovery, stored_accuracy
from lib.salf.pooling import Standardiser, pool_concepts
from lib.stores import ArraySpec, ShardedWriter, open_store
from lib.streams import batch_source

__all__ = ["CblReport", "SparseReport", "cbl_layer", "run_cbl", "run_sparse"]


def cbl_layer(config: Params) -> str:
    """The backbone layer the bottleneck reads (cbl.layer, default the last of features.layers)."""
    return config.cbl.layer or config.features.layers[-1]


def _progress_callback(progress: Progress | None, description: str, total: int, key: str):
    """A train/fit progress callback that moves a rich bar and shows the latest `key` metric."""
    if progress is None:
        return None
    task = progress.add_task(description, total=total)

    def update(step: int, metrics: dict[str, float]) -> None:
        progress.update(task, completed=step, description=f"{description} ({key} {metrics[key]:.4f})")

    return update


@dataclass(frozen=True)
class CblReport:
    n_train: int
    n_val: int
    val_from_train: bool
    n_concepts: int
    dropped: list[str]
    best_step: int
    best_val_loss: float
    stopped_early: bool


def run_cbl(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> CblReport:
    """Train the bottleneck on the train split, early-stopped on val; drop concepts whose val
    cos^3 is below cbl.cos3_threshold. Writes the bottleneck, the concept list and the loss curve."""
    params = config.cbl
    splits = splits_of(config, layout)
    layer = cbl_layer(config)
    features = open_store(layout.features(layer))["features"]
    concepts = read_concepts(layout.concepts)
    target = similarity_target(layout, concepts)
    stream = dict(device=device, in_memory_mb=params.in_memory_mb)
    train = pair_batches(features, target, splits.train, params.batch_size, shuffle=True, seed=params.seed, **stream)
    val = pair_batches(features, target, splits.val, params.batch_size, **stream)
    model, history = train_bottleneck(
        train, val, features.shape[1], target.n_concepts, target.grid,
        lr=params.lr, max_steps=params.max_steps, eval_every=params.eval_every, patience=params.patience,
        seed=params.seed, device=device,
        progress=_progress_callback(progress, "cbl", params.max_steps, "val_loss"),
    )
    scores = concept_scores(model, val).cpu()
    kept_model, keep = filter_concepts(model, scores, params.cos3_threshold)
    rows = [{"name": n, "type": t, "cos3": float(s)} for n, t, s in zip(concepts.names, concepts.types, scores)]
    is_kept = set(keep.tolist())
    kept = [rows[i] for i in keep.tolist()]
    dropped = [row for i, row in enumerate(rows) if i not in is_kept]
    provenance = {
        "stage": "cbl",
        "params_hash": params_hash(config.cbl, config.similarity, config.features, config.backbone, config.data),
    }
    save_bottleneck(layout.salf_bottleneck, kept_model, layer, kept, provenance)
    write_json(layout.salf_concepts, {"threshold": params.cos3_threshold, "kept": kept, "dropped": dropped})
    write_csv(layout.salf_plot("cbl_train"), pd.DataFrame({"step": history["step"], "train_loss": history["train_loss"]}))
    write_csv(layout.salf_plot("cbl_val"), pd.DataFrame({"step": history["val_step"], "val_loss": history["val_loss"]}))
    write_figure(layout.salf_figure("cbl_loss"), loss_curve_figure(history))
    return CblReport(
        n_train=len(splits.train),
        n_val=len(splits.val),
        val_from_train=splits.val_from_train,
        n_concepts=len(rows),
        dropped=[row["name"] for row in dropped],
        best_step=history["best_step"],
        best_val_loss=history["best_val_loss"],
        stopped_early=history["stopped_early"],
    )


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
    """A split's (standardised c*, labels) for lib.salf.glm: tensors on the device when they fit
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
        progress=_progress_callback(progress, "lambda path", params.n_lambdas, "val_acc"), **fit,
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
    return SparseReport(metrics, len(path.lambdas), float(path.lambdas[selected]))
