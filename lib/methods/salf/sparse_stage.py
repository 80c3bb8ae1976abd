"""The sparse stage's work: the c* store, the elastic-net final layer and SALF-CBM's test metrics."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.progress import Progress

from lib.core.distributed import Ranks, sharded_outputs
from lib.core.extract import fill_stores
from lib.core.layout import Layout
from lib.core.outputs import write_csv, write_figure, write_json
from lib.core.params import Params, params_hash
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.data.manifest import read_dataset_info
from lib.methods.salf.artifacts import load_bottleneck, save_classifier
from lib.methods.salf.baselines import POOLED, run_baselines
from lib.methods.salf.classifier import ConceptClassifier
from lib.methods.salf.data import splits_of
from lib.methods.salf.figures import path_figure
from lib.methods.salf.final import fit_final_layers
from lib.methods.salf.metrics import backbone_accuracy, rule_recovery
from lib.methods.salf.model import ConceptBottleneck
from lib.methods.salf.pooling import pool_concepts
from lib.models.classes import read_class_map

__all__ = ["SparseReport", "run_sparse"]


def _write_activations(
    layout: Layout, bottleneck: ConceptBottleneck, layer: str, pooling: str, device: torch.device, progress: Progress | None
) -> None:
    """In one pass over the layer's features: the c* store, pooled (not standardised) concept
    activations (N, M) of every image, and the pooled-features store (N, C) the Table 1 baselines
    read (lib/methods/salf/baselines.py).

    The lambda path makes hundreds of passes over c*; reading it from this small store instead of
    recomputing it from the features keeps each pass cheap at any N. Its fingerprint is the
    bottleneck's weights and sampling positions, the pooling and the feature store's fingerprint,
    so a retrained bottleneck or new features rebuild it; the pooled features depend on the
    features alone.
    """
    feature_store = open_store(layout.features(layer))
    features = feature_store["features"]
    n, rows = features.shape[0], (features.shards or features.chunks)[0]
    bottleneck_bytes = b"".join(t.detach().cpu().numpy().tobytes() for t in (bottleneck.conv.weight, bottleneck.positions))
    fingerprints = {
        "c": params_hash(pooling, layer, hashlib.sha256(bottleneck_bytes).hexdigest(), feature_store.attrs["fingerprint"]),
        POOLED: params_hash("avg", layer, feature_store.attrs["fingerprint"]),
    }
    specs = {
        "c": ArraySpec("activations", (n, bottleneck.conv.out_channels), "float32", ("item", "concept")),
        POOLED: ArraySpec(POOLED, (n, features.shape[1]), "float32", ("item", "channel")),
    }
    paths = {"c": layout.salf_activations, POOLED: layout.salf_pooled}
    poolings = {"c": pooling, POOLED: "avg"}

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {
            key: ShardedWriter(
                paths[key], [specs[key]], rows,
                {"stage": "sparse", "params_hash": fingerprints[key], "layer": layer, "pooling": poolings[key]},
                fingerprints[key], create=create,
            )
            for key in specs
        }

    def encode(block: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "c": {"activations": pool_concepts(bottleneck(block), pooling)},
            POOLED: {POOLED: block.to(torch.float32).mean(dim=(2, 3))},
        }

    with sharded_outputs(make_writers, Ranks()) as writers:
        fill_stores(writers, features, encode, batch_size=rows, device=device, progress=progress, description="c*")


@dataclass(frozen=True)
class SparseReport:
    metrics: dict
    n_lambdas: int
    selected_lambda: float
    metrics_path: Path

    def summary(self) -> str:
        m = self.metrics
        recovery = "" if m["rule_recovery"] is None else f", rule recovery {m['rule_recovery']:.2f}"
        backbone = (  # backbone.new_head: no backbone class scores (lib/models/classes.py)
            "no backbone accuracy (new head)" if m["acc_backbone"] is None
            else f"backbone {m['acc_backbone']:.3f} (top-1 over all its outputs {m['acc_backbone_unrestricted']:.3f})"
        )
        baselines = "" if m.get("acc_backbone_sparse") is None else (
            f"; baselines: backbone sparse {m['acc_backbone_sparse']:.3f}, LF-CBM sparse {m['acc_lfcbm_sparse']:.3f} "
            f"dense {m['acc_lfcbm_dense']:.3f}"
        )
        return (
            f"test accuracy sparse {m['acc_sparse']:.3f} ({m['nonzero_per_class']:.1f} weights/class, lambda "
            f"{self.selected_lambda:.2e}), dense {m['acc_dense']:.3f}, {backbone}{recovery}"
            f"{baselines} -> {self.metrics_path}"
        )


def run_sparse(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> SparseReport:
    """Pool and standardise the concept maps, fit the elastic net (the lambda path with lambda picked
    by val accuracy within sparse.target_nonzeros_per_class, or sparse.lam alone), fit the dense
    comparison layer and score all on test; with sparse.baselines also SALF-CBM Table 1's baselines.

    Writes the c* store, the classifier, metrics/salf.json and the path plot data.
    """
    params = config.sparse
    info = read_dataset_info(layout.dataset_info)
    classes = list(info["classes"])
    splits = splits_of(config, layout)
    logits = open_store(layout.logits)
    class_map = read_class_map(logits.attrs, layout.logits)  # before any work: an old store needs the features stage again
    bottleneck, meta = load_bottleneck(layout.salf_bottleneck, device)
    _write_activations(layout, bottleneck, meta["layer"], params.pooling, device, progress)
    activations = open_store(layout.salf_activations)["activations"]
    labels = open_store(layout.images)["labels"]
    final = fit_final_layers(activations, labels, splits, len(classes), params, device, progress=progress)
    path, selected = final.path, final.selected
    names = tuple(c["name"] for c in meta["concepts"])
    recovery = rule_recovery(final.weight, names, info)
    metrics = {
        **(dict.fromkeys(("acc_backbone", "acc_backbone_unrestricted")) if class_map is None
           else backbone_accuracy(logits["logits"], labels, splits.test, class_map)),
        "acc_sparse": final.acc_sparse,
        "acc_dense": final.acc_dense,
        "nonzero_per_class": final.nonzero_per_class,
        "rule_recovery": None if recovery is None else recovery[0],
        "rule_recovery_per_class": None if recovery is None else recovery[1],
        "val_acc_sparse": float(path.val_acc[selected]),
        "lambda": final.lam,
        "lambda_mode": "path" if params.lam is None else "fixed",
        "n_concepts": len(names),
    }
    if params.baselines:
        metrics.update(run_baselines(config, layout, splits, len(classes), device, progress))
    classifier = ConceptClassifier(
        params.pooling, final.standardiser, final.weight.cpu(), final.bias.cpu(), names, tuple(classes)
    )
    provenance = {"stage": "sparse", "params_hash": params_hash(config.sparse, meta["provenance"]["params_hash"])}
    save_classifier(layout.salf_classifier, classifier, final.dense, path.summary(), selected, provenance)
    write_json(layout.salf_metrics, metrics)
    write_csv(layout.salf_plot("path"), pd.DataFrame(path.summary()))
    write_figure(layout.salf_figure("path"), path_figure(path, selected))
    return SparseReport(metrics, len(path.lambdas), final.lam, layout.salf_metrics)
