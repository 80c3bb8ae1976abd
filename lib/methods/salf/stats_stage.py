"""The salf_stats stage's work: SALF-CBM's per-image concept statistics store, read by `stats`.

For each test image: presence = c* (pooled concept activations, standardised with the train
statistics: 0 is the concept's train mean, so "present" — c* > 0 — means "above its train average"),
and contribution = W[l, m]·c*[m] to the logit of the sparse layer's prediction l (they sum to that
logit minus its bias). Layout of the store: lib/core/schema.py (STATS_IMAGE ... CONTRIBUTION).

A stage of its own rather than part of `sparse`: it reads only sparse's outputs, so changing what
it writes never refits the lambda path (minutes to hours at scale), and it runs in seconds.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from lib.core.layout import Layout
from lib.core.params import Params, params_hash, source_hash
from lib.core.schema import CONTRIBUTION, LOGITS, PRED_BACKBONE, PRED_MODEL, PRESENCE, STATS_IMAGE, STATS_LABEL, concept_stats_specs
from lib.core.stores import ShardedWriter, open_store
from lib.core.streams import batch_source
from lib.data.manifest import read_manifest
from lib.methods.salf.artifacts import load_classifier
from lib.methods.salf.classifier import ConceptClassifier
from lib.methods.salf.data import salf_splits
from lib.models.classes import ClassMap, read_class_map

__all__ = ["SalfStatsReport", "concept_stats_block", "run_salf_stats"]

ACTIVATIONS = "activations"  # the c* store's array (lib/methods/salf/sparse_stage.py)


@torch.no_grad()
def concept_stats_block(
    classifier: ConceptClassifier, activations: Tensor, backbone_logits: Tensor, class_map: ClassMap | None
) -> dict[str, Tensor]:
    """Presence, contribution and both predictions of a batch: raw c* (B, M), the backbone's stored
    logits (B, outputs) and how the dataset's classes map onto them (None with backbone.new_head:
    the backbone then predicts no dataset class, written as -1)."""
    presence = classifier.standardiser(activations)
    weight = classifier.weight.to(presence.device)
    prediction = (presence @ weight.T + classifier.bias.to(presence.device)).argmax(dim=1)
    backbone = torch.full_like(prediction, -1) if class_map is None else class_map.predict(backbone_logits.to(presence.device))
    return {PRESENCE: presence, CONTRIBUTION: weight[prediction] * presence, PRED_MODEL: prediction, PRED_BACKBONE: backbone}


@dataclass(frozen=True)
class SalfStatsReport:
    n_images: int
    n_concepts: int
    acc_model: float
    acc_backbone: float | None  # None: backbone.new_head
    path: Path

    def summary(self) -> str:
        backbone = "" if self.acc_backbone is None else f", backbone {self.acc_backbone:.3f}"
        return f"{self.n_images} test images x {self.n_concepts} concepts; accuracy sparse {self.acc_model:.3f}{backbone} -> {self.path}"


def run_salf_stats(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> SalfStatsReport:
    """Write data/<name>/salf/concept_stats.zarr for the test split (the rows SALF-CBM's metrics use)."""
    classifier, _ = load_classifier(layout.salf_classifier, device)
    manifest = read_manifest(layout.manifest)
    rows = salf_splits(manifest, config.cbl.val_fraction, config.cbl.seed).test
    labels = manifest.set_index("index").loc[rows, "label"].to_numpy(np.int64)
    activations_store, logits_store = open_store(layout.salf_activations), open_store(layout.logits)
    class_map = read_class_map(logits_store.attrs, layout.logits)
    activations = activations_store[ACTIVATIONS]
    rows_per_shard = (activations.shards or activations.chunks)[0]
    fingerprint = params_hash(
        hashlib.sha256(layout.salf_classifier.read_bytes()).hexdigest(),
        activations_store.attrs["fingerprint"],
        logits_store.attrs["fingerprint"],
        hashlib.sha256(rows.tobytes() + labels.tobytes()).hexdigest(),
        source_hash(sys.modules[__name__]),
    )
    attributes = {"stage": "salf_stats", "method": "salf", "split": "test", "concepts": list(classifier.concept_names)}
    path = layout.concept_stats("salf")
    writer = ShardedWriter(path, concept_stats_specs(len(rows), len(classifier.concept_names)), rows_per_shard, attributes, fingerprint)
    pending = set(writer.pending())
    task = progress.add_task("concept stats", total=len(rows)) if progress is not None else None
    source = batch_source({ACTIVATIONS: activations, LOGITS: logits_store[LOGITS]}, rows, rows_per_shard, device=device)
    # batches come in row order, rows_per_shard at a time: batch i is exactly output shard i
    for shard, batch in enumerate(source()):
        if shard in pending:
            block = concept_stats_block(classifier, batch[ACTIVATIONS], batch[LOGITS], class_map)
            block = {name: value.cpu().numpy() for name, value in block.items()}
            span = writer.rows(shard)
            writer.write(shard, {**block, STATS_IMAGE: batch["index"].cpu().numpy(), STATS_LABEL: labels[span]})
        if task is not None:
            progress.advance(task, len(batch["index"]))
    writer.finalize()
    group = open_store(path)
    label, pred_model, pred_backbone = (group[name][:] for name in (STATS_LABEL, PRED_MODEL, PRED_BACKBONE))
    acc_backbone = None if class_map is None else float((pred_backbone == label).mean())
    return SalfStatsReport(len(rows), len(classifier.concept_names), float((pred_model == label).mean()), acc_backbone, path)
