"""The cbl stage's work: train the SALF-CBM concept bottleneck and keep the concepts it learned.

Under `torchrun --nproc-per-node K` it trains with DDP: each rank streams the whole shards it owns
of train and val (lib.core.distributed.rank_rows) in batches of cbl.batch_size // K (the global
batch stays cbl.batch_size), and rank 0 writes the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from rich.progress import Progress

from lib.core.device import available_memory
from lib.core.distributed import Ranks, rank_rows
from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.outputs import write_csv, write_figure, write_json
from lib.core.params import Params, params_hash
from lib.core.progress import progress_callback
from lib.core.stores import open_store
from lib.kernels.registration import sample_features
from lib.methods.salf.artifacts import save_bottleneck
from lib.methods.salf.cbl import concept_scores, filter_concepts, step_bytes, train_bottleneck
from lib.methods.salf.data import held_pair_bytes, pair_batches, registration_of, similarity_target, splits_of
from lib.methods.salf.figures import loss_curve_figure
from lib.pipeline.stored_concepts import read_concepts

__all__ = ["CblReport", "cbl_layer", "check_fits", "run_cbl"]


def cbl_layer(config: Params) -> str:
    """The backbone layer the bottleneck reads (cbl.layer, default the last of features.layers)."""
    return config.cbl.layer or config.features.layers[-1]


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

    def summary(self) -> str:
        val = "val carved from train" if self.val_from_train else "manifest val split"
        dropped = f" (dropped: {', '.join(self.dropped)})" if self.dropped else ""
        return (
            f"{self.n_concepts - len(self.dropped)}/{self.n_concepts} concepts kept{dropped}; best val cos^3 "
            f"{-self.best_val_loss:.3f} at step {self.best_step}{' (early stop)' if self.stopped_early else ''}; "
            f"{self.n_train} train / {self.n_val} val images ({val})"
        )


def check_fits(config: Params, device: torch.device, n_train: int, n_val: int, channels: int, n_concepts: int, grid: int) -> None:
    """Refuse, before any work, a cbl.batch_size whose training step (lib.methods.salf.cbl.step_bytes)
    plus the splits held in cbl.in_memory_mb does not fit the device's free memory."""
    params = config.cbl
    available = available_memory(device)
    if available is None:
        return
    held = sum(held_pair_bytes(n, channels, n_concepts, grid, params.in_memory_mb) for n in (n_train, n_val))
    batch = min(params.batch_size, n_train)
    needed = step_bytes(batch, n_concepts, channels, grid) + held
    if needed > available:
        fixed = step_bytes(0, n_concepts, channels, grid)
        fits = max(0, (available - held - fixed) // (step_bytes(1, n_concepts, channels, grid) - fixed))
        raise UserError(
            f"a training step of {batch} images x {n_concepts} concepts x {grid}x{grid} cells needs {needed / 2**20:,.1f} MiB"
            f"{f' (with {held / 2**20:,.1f} MiB of cached splits)' if held else ''} but {device} has {available / 2**20:,.1f} MiB free",
            key="cbl.batch_size", value=params.batch_size,
            fix=f"lower it (at most {fits} fits here){', or cbl.in_memory_mb' if held else ''}, or use a larger device",
        )


def run_cbl(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None = None) -> CblReport:
    """Train the bottleneck on the train split, early-stopped on val; drop concepts whose val
    cos^3 is below cbl.cos3_threshold. Writes the bottleneck, the concept list and the loss curve."""
    params = config.cbl
    splits = splits_of(config, layout)
    layer = cbl_layer(config)
    features = open_store(layout.features(layer))["features"]
    concepts = read_concepts(layout.concepts)
    registration = registration_of(layout, layer)  # first: it checks the stores against the current images
    target = similarity_target(layout, concepts)
    if registration.grid != target.grid:
        raise ValueError(f"the circles store has a {registration.grid}x{registration.grid} grid, P {target.grid}x{target.grid}")
    check_fits(config, device, len(splits.train), len(splits.val), features.shape[1], target.n_concepts, target.grid)
    # cell (h, w) reads the features at its circle's centre, mapped through CLIP's and the backbone's views
    positions = registration.feature_grid(device)
    sampler = partial(sample_features, grid=positions)
    stream = dict(device=device, in_memory_mb=params.in_memory_mb)
    rows_per_shard, batch = (features.shards or features.chunks)[0], max(1, params.batch_size // ranks.world_size)
    train_rows, val_rows = (rank_rows(rows, rows_per_shard, ranks) for rows in (splits.train, splits.val))
    train = pair_batches(features, target, train_rows, batch, sampler, shuffle=True, seed=params.seed + ranks.rank, **stream)
    val = pair_batches(features, target, val_rows, batch, sampler, **stream)
    model, history = train_bottleneck(
        train, val, features.shape[1], target.n_concepts, positions,
        lr=params.lr, max_steps=params.max_steps, eval_every=params.eval_every, patience=params.patience,
        seed=params.seed, device=device, ranks=ranks,
        progress=progress_callback(progress, "cbl", params.max_steps, "val_loss"),
    )
    scores = concept_scores(model, val, ranks).cpu()
    kept_model, keep = filter_concepts(model, scores, params.cos3_threshold)
    rows = [{"name": n, "type": t, "cos3": float(s)} for n, t, s in zip(concepts.names, concepts.types, scores)]
    is_kept = set(keep.tolist())
    kept = [rows[i] for i in keep.tolist()]
    dropped = [row for i, row in enumerate(rows) if i not in is_kept]
    report = CblReport(
        n_train=len(splits.train),
        n_val=len(splits.val),
        val_from_train=splits.val_from_train,
        n_concepts=len(rows),
        dropped=[row["name"] for row in dropped],
        best_step=history["best_step"],
        best_val_loss=history["best_val_loss"],
        stopped_early=history["stopped_early"],
    )
    if not ranks.is_main:  # every rank holds the same model; one writes it
        return report
    provenance = {
        "stage": "cbl",
        "params_hash": params_hash(config.cbl, config.similarity, config.features, config.backbone, config.data),
    }
    save_bottleneck(layout.salf_bottleneck, kept_model, layer, kept, registration, provenance)
    write_json(layout.salf_concepts, {"threshold": params.cos3_threshold, "kept": kept, "dropped": dropped})
    write_csv(layout.salf_plot("cbl_train"), pd.DataFrame({"step": history["step"], "train_loss": history["train_loss"]}))
    write_csv(layout.salf_plot("cbl_val"), pd.DataFrame({"step": history["val_step"], "val_loss": history["val_loss"]}))
    write_figure(layout.salf_figure("cbl_loss"), loss_curve_figure(history))
    return report


