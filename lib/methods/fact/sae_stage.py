"""The sae stage's work: train the bias-free TopK SAE on the sae_data vectors, resumably.

Training streams batches from the store (`VectorStream`: bounded memory, the batch of a step a pure
function of the step). Every `fact.sae.checkpoint_every` steps the whole training state (model,
Adam, scheduler, step) goes to a checkpoint in the scratch area (Layout.fact_checkpoint: outside
the stage's DVC outputs, so DVC never deletes it), named by the fingerprint of everything the
result depends on; the loss log so far is written beside it first. A killed run resumes from the
last checkpoint and ends with the same model as an uninterrupted one. The finished model is
published atomically to data/<name>/fact/sae.pt, the loss curve to metrics/plots/fact_sae.csv, and
the checkpoint is removed.

Under `torchrun --nproc-per-node K` it trains with DDP (train.py): each rank streams the shards of
vectors it owns in batches of fact.sae.batch_size // K, and rank 0 writes the checkpoints and the
outputs (every rank resumes from the same checkpoint: on several nodes the data folder must be shared).

Why our own SAE (lib/methods/fact/sae.py) and not a package: `overcomplete`'s TopK SAE and
`dictionary_learning`'s AutoEncoderTopK both carry an encoder bias and a decoder bias (b_dec, which
is also subtracted from the input), and FaCT's exactness needs the map x -> x_hat to be bias-free and
linear in the codes; FaCT's own code deletes those biases from a dictionary_learning copy. Neither
package trains from a sharded store with a resumable step-indexed stream either.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.progress import Progress

from lib.core.distributed import Ranks, barrier
from lib.core.errors import user_error_for
from lib.core.layout import Layout
from lib.core.outputs import write_csv
from lib.core.params import Params, params_hash, source_hash
from lib.core.schema import FEATURES
from lib.core.stores import open_store, remove_empty_scratch_dirs
from lib.data.manifest import read_manifest, train_val_indices
from lib.methods.fact import sae as sae_module
from lib.methods.fact import train as train_module
from lib.methods.fact.artifacts import save_sae
from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.methods.fact.streams import VECTORS, VectorStream, fact_layer, feature_vectors
from lib.methods.fact.train import TrainConfig, TrainState, fraction_of_variance_explained, train

__all__ = ["SaeReport", "run_sae"]

LOG_COLUMNS = ("step", "loss", "nmse", "aux", "dead_fraction", "lr")


@dataclass(frozen=True)
class SaeReport:
    n_concepts: int
    k: int
    steps: int
    resumed_from: int
    fve_val: float
    dead_fraction: float
    path: Path

    def summary(self) -> str:
        resumed = f", resumed from step {self.resumed_from}" if self.resumed_from else ""
        return (
            f"{self.n_concepts} concepts, k={self.k}, {self.steps} steps{resumed}; val fve {self.fve_val:.4f}, "
            f"dead {self.dead_fraction:.1%} -> {self.path}"
        )


def _read_log(path: Path, before: int) -> list[dict[str, float]]:
    """The log rows of steps < `before` (a checkpoint may lag the log written just before it)."""
    if not path.exists():
        return []
    frame = pd.read_csv(path)
    return frame[frame["step"] < before].to_dict("records")


def run_sae(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None = None) -> SaeReport:
    """Train (or resume training) the SAE and publish data/<name>/fact/sae.pt and metrics/plots/fact_sae.csv."""
    settings, seed = config.fact.sae, config.fact.seed
    store = open_store(layout.fact_vectors)
    vectors = store[VECTORS]
    with user_error_for("fact.sae.batch_size", settings.batch_size, fix="lower it or raise fact.sae.buffer_shards"):
        stream = VectorStream(vectors, max(1, settings.batch_size // ranks.world_size), seed, settings.buffer_shards, ranks)
    fingerprint = params_hash(settings, {"seed": seed}, store.attrs["fingerprint"], source_hash(sae_module), source_hash(train_module),
                              source_hash(sys.modules[__name__]))
    checkpoint = layout.fact_checkpoint(fingerprint)
    log_path = checkpoint.with_suffix(".csv")
    if ranks.is_main:
        for stale in checkpoint.parent.glob("sae_checkpoint-*"):  # other settings' abandoned runs
            if stale not in (checkpoint, log_path):
                stale.unlink()
    barrier(ranks)

    if checkpoint.exists():
        state = TrainState.from_checkpoint(checkpoint, device, ranks)
        rows = _read_log(log_path, state.step)
    else:
        model = BiasFreeTopKSAE(
            vectors.shape[1], settings.n_concepts, settings.k, aux_k=settings.aux_k, aux_coef=settings.aux_coef,
            dead_after=settings.dead_after, generator=torch.Generator().manual_seed(seed),
        ).to(device)
        rows_per_shard = (vectors.shards or vectors.chunks)[0]
        model.fit_scale(torch.from_numpy(vectors[s : s + rows_per_shard]).to(device) for s in range(0, vectors.shape[0], rows_per_shard))
        train_config = TrainConfig(
            steps=settings.steps, lr=settings.lr, warmup_steps=settings.warmup_steps, min_lr_factor=settings.min_lr_factor,
            grad_clip=settings.grad_clip, seed=seed,
        )
        state = TrainState.create(model, train_config, ranks)
        rows = []
    resumed_from = state.step
    batches = stream.batches(state.step)
    task = progress.add_task("sae", total=settings.steps, completed=state.step) if progress is not None else None
    while state.step < settings.steps:
        until = min(settings.steps, (state.step // settings.checkpoint_every + 1) * settings.checkpoint_every)
        log = train(state, batches, until=until)
        rows += log.rows()
        if ranks.is_main:
            write_csv(log_path, pd.DataFrame(rows, columns=LOG_COLUMNS))  # the log first: a checkpoint never runs ahead of it
            state.save_checkpoint(checkpoint)
        if task is not None:
            progress.update(task, completed=state.step, description=f"sae (nmse {log.nmse[-1]:.4f})")

    model = state.model.eval()
    manifest = read_manifest(layout.manifest)
    _, val, _ = train_val_indices(manifest, config.fact.val_fraction, seed)
    layer = fact_layer(config)
    feats = open_store(layout.features(layer))[FEATURES]
    fve_val = fraction_of_variance_explained(model, (v.to(device) for v in feature_vectors(feats, val, config.fact.batch_size)))
    dead = float(rows[-1]["dead_fraction"]) if rows else 0.0
    report = SaeReport(settings.n_concepts, settings.k, state.step, resumed_from, fve_val, dead, layout.fact_sae)
    if not ranks.is_main:  # every rank holds the same model; one publishes it
        return report
    record = {"layer": layer, "model_id": store.attrs["model_id"], "fingerprint": fingerprint, "steps": state.step, "fve_val": fve_val}
    save_sae(layout.fact_sae, model, record)
    write_csv(layout.fact_plot("sae"), pd.DataFrame(rows, columns=LOG_COLUMNS))
    checkpoint.unlink()
    log_path.unlink()
    remove_empty_scratch_dirs(checkpoint.parent)
    return report
