"""The contributions stage's work: the SAE spliced into the backbone at its layer, on the test split.

Per test image and the class the spliced model predicts (mapped onto the backbone's output as the
features stage recorded), every concept's presence P_j and contribution C_j to that logit
(lib/methods/fact/contributions.py: one backward per batch of images), written to
data/<name>/fact/concept_stats.zarr in the form the `stats` stage reads (lib/core/schema.py). The
stage computes every shard in one pass (the tail's forward and backward are cheap next to the
features stage) and writes the ones a killed run left missing, so its metrics always cover all
images.

metrics/fact.json:
- fve: fraction of variance of the layer's features the SAE explains, every position of every test
  image; l0: mean number of concepts present (P_j > 0) per image; alive_pct: % of concepts with a
  nonzero contribution in some test image; poscover80: mean number of concepts needed for 80% of an
  image's positive contribution (lib/metrics/concepts.py).
- acc_backbone (the stored logits), acc_spliced (the SAE in place): test accuracies (null with
  backbone.new_head: FaCT then explains the backbone's own top output, no dataset class).
- completeness_max_rel_err: max over images of |sum_j C_j - (y_c - b)| / |y_c - b|, b = the tail's
  logit for an all-zero map (its logit bias), y_c - b in float64 (FactBackbone.unbiased_logits). On
  a dynamic-linear (B-cos) tail it must be at most fact.completeness_tol, else the stage fails (a
  bug, not a setting); on other backbones it is reported (a ReLU network's tail after its last
  block, average pooling and a linear layer, is linear too, and then it is ~1e-7). It holds with
  explanation mode off too (Euler), so it cannot tell whether the C_j split y faithfully:
- completeness_concept_max_err: max over images of max_j |C_j - C_j^ref| / max_j |C_j^ref|, C_j^ref
  concept j's logit through the tail frozen at x̂, computed without autograd
  (lib/methods/fact/completeness.py). Fails the stage above fact.completeness_tol on B-cos; with
  explanation mode off it is of order 0.1-1. Null where the tail has no frozen form.
- spliced_logit_max_rel_err, spliced_logit_mean_rel_err: |y_c(x̂) - y_c(A)| / |y_c(A) - b| over the
  images, the explained logit with the SAE spliced in against the backbone's own (A: the layer's
  features): how much the reconstruction moves what is explained.
- c2_delta = c2 - c2_random, the C²-Score's headline (the paper's Δ_rand), by the authors' definition
  (lib/methods/fact/c2.py): c2 the mean C² over the concepts with at least fact.c2.mean_min_images
  images (c2_concepts of them; c2_scored concepts have the fact.c2.min_count images to be scored),
  c2_random that of one pooled random concept over every test image; c2_featurizer names the
  featurizer (each is another metric). Per concept to data/<name>/fact/c2.parquet (images, C²,
  spatial extent), the histogram to metrics/plots/fact_c2.csv.
- gt_found, gt_concepts, match_score: on data with concept masks, how many ground-truth concepts
  found a latent on val and the mean best correlation (lib/methods/fact/matching.py, written in
  full to data/<name>/fact/matching.json, which `evaluate` reads). On data without masks the
  matching is skipped (lib/core/skipped.py): 0, 0, null, and matching.json says why.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from lib.core.distributed import Ranks, gather_objects, sharded_outputs
from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.outputs import write_csv, write_json, write_parquet
from lib.core.params import Params, params_hash, source_hash
from lib.core.schema import (
    CONTRIBUTION,
    FEATURES,
    LOGITS,
    PRED_BACKBONE,
    PRED_MODEL,
    PRESENCE,
    STATS_IMAGE,
    STATS_LABEL,
    concept_stats_specs,
)
from lib.core.skipped import no_masks, skipped
from lib.core.stores import ShardedWriter, open_store
from lib.core.streams import read_rows
from lib.data.manifest import read_dataset_info, read_manifest, split_indices, train_val_indices
from lib.methods.fact.artifacts import load_sae
from lib.methods.fact.backbone import FactBackbone, check_fact, load_fact_backbone
from lib.methods.fact.c2 import C2Result
from lib.methods.fact.completeness import frozen_contributions
from lib.methods.fact.consistency import fact_c2, top_images
from lib.methods.fact.contributions import concept_contributions, splice
from lib.methods.fact.featurizers import check_featurizer, load_featurizer
from lib.methods.fact.matching import LatentCorrelation, Matching
from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.methods.fact.streams import fact_layer, feature_vectors
from lib.methods.fact.train import fraction_of_variance_explained
from lib.metrics.concepts import poscover

__all__ = ["ContributionsReport", "check_contributions", "explain_batch", "run_contributions"]

_TINY = 1e-12
_CHECKS = ("completeness", "concept_error", "spliced_error")


def check_contributions(config: Params) -> None:
    """The stage's checks before any work: FaCT's backbone section and layer, and fact.c2's featurizer."""
    check_fact(config)
    check_featurizer(config)


def explain_batch(backbone: FactBackbone, sae: BiasFreeTopKSAE, acts: Tensor, explanation_mode: bool = True,
                  reference_images: int | None = None) -> dict[str, Tensor]:
    """Presence, contributions, the spliced model's predicted class, and three checks per image (B,),
    for feature maps acts (B, C, H, W) of the SAE's layer (b: the tail's logit bias, c: the explained
    output; float64):
    - "completeness": |sum_j C_j - (y_c(x̂) - b)| / |y_c(x̂) - b|;
    - "concept_error": max_j |C_j - C_j^ref| / max_j |C_j^ref|, C_j^ref computed without autograd by
      the tail frozen at x̂ (lib/methods/fact/completeness.py; NaN where the tail has no frozen form);
    - "spliced_error": |(y_c(x̂) - b) - (y_c(acts) - b)| / |y_c(acts) - b|, the SAE's effect on the logit.
    `explanation_mode` False is for tests: the C_j then differentiate the B-cos scales too.
    reference_images: only the batch's first n images get "concept_error" (the others NaN): the frozen tail
    runs once per concept, the batch's costliest part (fact.completeness_check_images)."""
    with torch.no_grad():
        codes, x_hat = splice(sae, acts)
        predicted, target = backbone.explained_output(backbone.tail(x_hat))
        reference = backbone.unbiased_logits(x_hat).gather(1, target[:, None])[:, 0]
        unspliced = backbone.unbiased_logits(acts).gather(1, target[:, None])[:, 0]
    out = concept_contributions(backbone.tail, sae, acts, target, explanation_mode=explanation_mode)
    error = (out.contributions.double().sum(dim=1) - reference).abs() / reference.abs().clamp_min(_TINY)
    concept_error = torch.full_like(error, float("nan"))
    n = len(acts) if reference_images is None else min(reference_images, len(acts))
    try:
        frozen = frozen_contributions(backbone.tail64, x_hat[:n], codes[:n], sae.atoms, target[:n])
        concept_error[:n] = (out.contributions[:n].double() - frozen).abs().amax(dim=1) / frozen.abs().amax(dim=1).clamp_min(_TINY)
    except NotImplementedError:
        pass  # no frozen form of this tail: NaN
    return {
        PRESENCE: out.presence, CONTRIBUTION: out.contributions, PRED_MODEL: predicted, "completeness": error,
        "concept_error": concept_error, "spliced_error": (reference - unspliced).abs() / unspliced.abs().clamp_min(_TINY),
    }


@dataclass(frozen=True)
class ContributionsReport:
    metrics: dict[str, Any] | None  # None on torchrun ranks other than 0
    path: Path
    matching_skipped: str | None = None  # why the ground-truth matching was skipped (data without masks)

    def summary(self) -> str:
        if self.metrics is None:
            return f"this rank's shards written; rank 0 writes {self.path}"
        m = self.metrics
        c2 = "C² n/a (no concept has enough images)" if m["c2_delta"] is None else (
            f"C² Δ_rand {m['c2_delta']:.3f} (mean {m['c2']:.3f}, random {m['c2_random']:.3f}, featurizer {m['c2_featurizer']})"
        )
        found = f"; {m['gt_found']}/{m['gt_concepts']} ground-truth concepts found a latent" if m["gt_concepts"] else ""
        if self.matching_skipped:
            found = f"; ground-truth matching skipped: {self.matching_skipped}"
        accuracy = (
            "no dataset classes (backbone.new_head)" if m["acc_backbone"] is None
            else f"accuracy backbone {m['acc_backbone']:.3f}, spliced {m['acc_spliced']:.3f}"
        )
        return (
            f"fve {m['fve']:.4f}, L0 {m['l0']:.1f}, alive {m['alive_pct']:.1f}%, PosCover-80 {m['poscover80']:.2f}; {accuracy}; "
            f"completeness error {m['completeness_max_rel_err']:.2e}; {c2}{found} -> {self.path}"
        )


def _match(config: Params, layout: Layout, sae: BiasFreeTopKSAE, device: torch.device) -> Matching:
    """Latent of each ground-truth concept on val (data with concept masks)."""
    images = open_store(layout.images)
    info = read_dataset_info(layout.dataset_info)
    _, val, _ = train_val_indices(read_manifest(layout.manifest), config.fact.val_fraction, config.fact.seed)
    feats = open_store(layout.features(fact_layer(config)))[FEATURES]
    correlation = LatentCorrelation(sae.n_concepts, images["masks"].shape[1])
    for start in range(0, len(val), config.fact.batch_size):
        rows = val[start : start + config.fact.batch_size]
        acts = torch.from_numpy(read_rows(feats, rows)).to(device, torch.float32)
        with torch.no_grad():
            codes, _ = splice(sae, acts)
        b, _, h, w = acts.shape
        correlation.add(codes.reshape(b, h, w, -1), torch.from_numpy(read_rows(images["masks"], rows)).to(device).bool())
    names = [concept["name"] for concept in info["concepts"]]
    return Matching.from_correlation(correlation.correlation(), names, config.fact.match_threshold)


def run_contributions(
    config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None = None
) -> ContributionsReport:
    """Write data/<name>/fact/concept_stats.zarr, fact/matching.json and metrics/fact.json (module doc).

    Under torchrun each rank explains the shards it owns and writes the missing ones; rank 0 gathers
    the ranks' statistics and writes the metrics (the store is the one-process store byte for byte;
    the C² images may differ only among images tied on presence)."""
    settings = config.fact
    backbone = load_fact_backbone(config, layout, device)
    sae, record = load_sae(layout.fact_sae, device)
    if (record["layer"], record["model_id"]) != (backbone.layer, backbone.model_id):
        raise UserError(
            f"{layout.fact_sae} was trained on {record['layer']} of {record['model_id']}, not {backbone.layer} of {backbone.model_id}",
            key="fact.layer", fix="rerun sae_data and sae (dvc repro)",
        )
    # C²'s featurizer, its data checked before any work; the gt featurizer on data without masks: C² skipped
    unmatched = no_masks(read_dataset_info(layout.dataset_info)["kind"])  # ground-truth matching needs masks too
    c2_skipped = unmatched if settings.c2.featurizer == "gt" else None
    featurizer = None if c2_skipped else load_featurizer(config, layout, device)
    manifest = read_manifest(layout.manifest)
    rows = split_indices(manifest, "test")
    labels = manifest.set_index("index").loc[rows, "label"].to_numpy(np.int64)
    feats_store, logits_store = open_store(layout.features(backbone.layer)), open_store(layout.logits)
    feats, stored_logits = feats_store[FEATURES], logits_store[LOGITS]
    n_concepts = sae.n_concepts

    fingerprint = params_hash(
        hashlib.sha256(layout.fact_sae.read_bytes()).hexdigest(), feats_store.attrs["fingerprint"], logits_store.attrs["fingerprint"],
        hashlib.sha256(rows.tobytes() + labels.tobytes()).hexdigest(), source_hash(sys.modules[__name__]),
    )
    attributes = {"stage": "contributions", "method": "fact", "split": "test", "concepts": [f"latent{j}" for j in range(n_concepts)]}
    path = layout.concept_stats("fact")

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {path.name: ShardedWriter(path, concept_stats_specs(len(rows), n_concepts), config.data.rows_per_shard, attributes,
                                         fingerprint, create=create, scratch=layout.scratch(path))}

    top = top_images(config, len(rows))
    alive = torch.zeros(n_concepts, dtype=torch.bool, device=device)
    l0, cover, correct_model, correct_backbone = [], [], 0, 0
    errors: list[dict[str, np.ndarray]] = []  # per shard: the three checks of explain_batch
    with sharded_outputs(make_writers, ranks) as writers:
        writer = writers[path.name]
        pending = set(writer.pending(ranks.rank, ranks.world_size))
        owned = range(ranks.rank, writer.n_shards, ranks.world_size)  # all of them, written or not: the metrics cover every image
        task = progress.add_task("contributions", total=sum(len(rows[writer.rows(s)]) for s in owned)) if progress is not None else None
        for shard in owned:
            span = writer.rows(shard)
            block_rows = rows[span]
            parts: list[dict[str, Tensor]] = []
            for start in range(0, len(block_rows), settings.batch_size):
                chunk = block_rows[start : start + settings.batch_size]
                acts = torch.from_numpy(read_rows(feats, chunk)).to(device, torch.float32)
                part = explain_batch(backbone, sae, acts, reference_images=settings.completeness_check_images)
                part[PRED_BACKBONE], _ = backbone.explained_output(torch.from_numpy(read_rows(stored_logits, chunk)).to(device))
                top.add(part[PRESENCE], torch.from_numpy(chunk))
                parts.append(part)
                if task is not None:
                    progress.advance(task, len(chunk))
            block = {name: torch.cat([p[name] for p in parts]).cpu().numpy() for name in parts[0]}
            alive |= torch.from_numpy(block[CONTRIBUTION] != 0).any(dim=0).to(device)
            l0.append((block[PRESENCE] > 0).sum(axis=1))
            cover.append(poscover(block[CONTRIBUTION], 0.8))
            errors.append({name: block.pop(name) for name in _CHECKS})
            correct_model += int((block[PRED_MODEL] == labels[span]).sum())
            correct_backbone += int((block[PRED_BACKBONE] == labels[span]).sum())
            if shard in pending:
                writer.write(shard, {**block, STATS_IMAGE: block_rows, STATS_LABEL: labels[span]})
    gathered = gather_objects((l0, cover, errors, correct_model, correct_backbone, alive.cpu(), top.cpu()), ranks)
    if not ranks.is_main:  # rank 0 writes the metrics of every rank's images
        return ContributionsReport(None, layout.fact_metrics)
    for other in gathered[1:]:
        l0, cover, errors = l0 + other[0], cover + other[1], errors + other[2]
        correct_model, correct_backbone, alive = correct_model + other[3], correct_backbone + other[4], alive | other[5].to(device)
        top.merge(other[6])

    fve = fraction_of_variance_explained(sae, (v.to(device) for v in feature_vectors(feats, rows, settings.batch_size)))
    checks = {name: np.concatenate([e[name] for e in errors]) for name in _CHECKS}
    completeness = float(checks["completeness"].max())
    checked = checks["concept_error"][np.isfinite(checks["concept_error"])]  # NaN: not checked, or no frozen form
    concept_error = float(checked.max()) if checked.size else None
    if backbone.dynamic_linear and completeness > settings.completeness_tol:
        raise RuntimeError(
            f"contributions are incomplete on a dynamic-linear backbone: max relative error {completeness:.3e} > "
            f"fact.completeness_tol {settings.completeness_tol:g} (sum_j C_j must equal the logit minus its bias)"
        )
    if backbone.dynamic_linear and concept_error is not None and concept_error > settings.completeness_tol:
        raise RuntimeError(
            f"contributions are not the frozen tail's: max error {concept_error:.3e} of the largest |C_j| > "
            f"fact.completeness_tol {settings.completeness_tol:g} (is explanation mode on in the tail?)"
        )
    matching = None if unmatched else _match(config, layout, sae, device)
    write_json(layout.fact_matching, matching.to_json() if matching is not None else {"concepts": [], **skipped(unmatched)})
    c2 = C2Result.skipped() if featurizer is None else fact_c2(config, layout, backbone, sae, featurizer, rows, top, progress)
    write_parquet(layout.fact_c2, c2.table)
    write_csv(layout.fact_plot("c2"), c2.histogram())
    metrics = {
        "fve": fve,
        "l0": float(np.concatenate(l0).mean()),
        "alive_pct": 100.0 * float(alive.float().mean()),
        "poscover80": float(np.nanmean(np.concatenate(cover))),
        "acc_backbone": None if backbone.class_map is None else correct_backbone / len(rows),  # None: backbone.new_head
        "acc_spliced": None if backbone.class_map is None else correct_model / len(rows),
        "completeness_max_rel_err": completeness,
        "completeness_concept_max_err": concept_error,
        "completeness_concept_images": int(checked.size),  # images held against the frozen-tail reference
        "spliced_logit_max_rel_err": float(checks["spliced_error"].max()),
        "spliced_logit_mean_rel_err": float(checks["spliced_error"].mean()),
        "dynamic_linear": backbone.dynamic_linear,
        "c2_delta": _finite(c2.c2_delta),
        "c2": _finite(c2.c2),
        "c2_random": _finite(c2.c2_random),
        "c2_concepts": c2.n_averaged,
        "c2_scored": c2.n_scored,
        "c2_featurizer": f"gt (skipped: {c2_skipped})" if featurizer is None else featurizer.name,
        "n_concepts": n_concepts,
        "k": sae.k,
        "gt_concepts": 0 if matching is None else len(matching.names),
        "gt_found": 0 if matching is None else matching.found,
        "match_score": None if matching is None else matching.mean_score,
    }
    # 6 digits, except the completeness errors, whose point is how small they are
    write_json(layout.fact_metrics, {k: round(v, 6) if isinstance(v, float) and not k.startswith("completeness") else v
                                     for k, v in metrics.items()})
    return ContributionsReport(metrics, layout.fact_metrics, unmatched)



def _finite(value: float) -> float | None:
    """JSON has no NaN: null (e.g. no concept with enough images for the mean)."""
    return value if np.isfinite(value) else None
