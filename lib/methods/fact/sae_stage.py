"""The sae stage's work: train the bias-free TopK SAE on the sae_data vectors, resumably, and keep
the checkpoint FaCT would keep; or publish a released FaCT checkpoint instead (fact.sae.checkpoint).

Scale and schedule are FaCT's, in epochs of the training vectors (train.EpochPlan): J =
round(fact.sae.expansion * C) latents, warm-up, hold, cosine to 0 at fact.sae.epochs, dead after
fact.sae.dead_epochs. At the end of every epoch the SAE is spliced into the backbone on the val split
(sae_val.py) and the state with the best spliced val accuracy is kept, ties to the lower val loss
(train.Selection); that is the published model.

Training streams batches from the store (`VectorStream`: bounded memory, the batch of a step a pure
function of the step). Every `fact.sae.checkpoint_every` steps and at every epoch end the whole
training state (model, Adam, scheduler, step, the kept state) goes to a checkpoint in the scratch
area (Layout.fact_checkpoint: outside the stage's DVC outputs, so DVC never deletes it), named by
the fingerprint of everything the result depends on; the log so far is written beside it first. A
killed run resumes from the last checkpoint and ends with the same model as an uninterrupted one.
The kept model is published atomically to data/<name>/fact/sae.pt, the training curve (per step;
val accuracy and loss at epoch ends) to metrics/plots/fact_sae.csv, its val figures to
metrics/fact_sae.json, and the checkpoint is removed.

Under `torchrun --nproc-per-node K` it trains with DDP (train.py): each rank streams the shards of
vectors it owns in batches of fact.sae.batch_size // K, every rank scores val alike, and rank 0
writes the checkpoints and the outputs (every rank resumes from the same checkpoint: on several
nodes the data folder must be shared).

Released checkpoints: with fact.sae.checkpoint, a state dict in FaCT's layout (dictionary_learning's
AutoEncoderTopK with the biases removed: encoder.weight (J, C), decoder.weight (C, J), k, threshold,
optionally FaCT's training `log`) is checked against the layer's C and published with its val figures;
nothing is trained. DVC does not watch the file itself, only the param: rerun with -f after replacing it.

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
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from rich.progress import Progress

from lib.core.distributed import Ranks, barrier
from lib.core.errors import UserError, user_error_for
from lib.core.layout import Layout
from lib.core.outputs import write_csv, write_json
from lib.core.params import Params, params_hash, source_hash
from lib.core.schema import FEATURES
from lib.core.stores import open_store, remove_empty_scratch_dirs
from lib.data.manifest import read_manifest, train_val_indices
from lib.methods.fact import sae as sae_module
from lib.methods.fact import sae_val as sae_val_module
from lib.methods.fact import train as train_module
from lib.methods.fact.artifacts import save_sae
from lib.methods.fact.backbone import FactBackbone, load_fact_backbone
from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.methods.fact.sae_val import ValScores, score_on_val
from lib.methods.fact.streams import VECTORS, VectorStream
from lib.methods.fact.train import EpochPlan, TrainConfig, TrainState, train

__all__ = ["SaeReport", "load_released", "run_sae"]

LOG_COLUMNS = ("step", "loss", "mse", "aux", "dead_fraction", "lr", "val_acc", "val_loss")


@dataclass(frozen=True)
class SaeReport:
    n_concepts: int
    k: int
    steps: int
    resumed_from: int
    kept_step: int  # the step of the published state (-1: a released checkpoint)
    val: ValScores
    dead_fraction: float
    path: Path

    def summary(self) -> str:
        resumed = f", resumed from step {self.resumed_from}" if self.resumed_from else ""
        kept = "released checkpoint" if self.kept_step < 0 else f"kept step {self.kept_step}"
        return (
            f"{self.n_concepts} concepts, k={self.k}, {self.steps} steps{resumed}; {kept}: val accuracy spliced "
            f"{self.val.accuracy:.3f}, loss {self.val.loss:.4f}, fve {self.val.fve:.4f}, dead {self.dead_fraction:.1%} -> {self.path}"
        )


@dataclass(frozen=True)
class _Val:
    """What scoring on val needs: the backbone and the val split's features and labels."""

    backbone: FactBackbone
    feats: zarr.Array
    rows: np.ndarray
    labels: np.ndarray
    batch_images: int

    def score(self, sae: BiasFreeTopKSAE) -> ValScores:
        return score_on_val(self.backbone, sae.eval(), self.feats, self.rows, self.labels, self.batch_images)


def _read_log(path: Path, before: int) -> list[dict[str, float]]:
    """The log rows of steps < `before` (a checkpoint may lag the log written just before it)."""
    if not path.exists():
        return []
    frame = pd.read_csv(path)
    return frame[frame["step"] < before].to_dict("records")


def load_released(path: str, channels: int, k: int) -> BiasFreeTopKSAE:
    """A FaCT-format SAE state dict (module doc) for a layer of `channels` channels; its own k if it
    has one, else `k`. UserError (key fact.sae.checkpoint) when it is missing, biased or of another shape."""
    with user_error_for("fact.sae.checkpoint", path, catch=(FileNotFoundError, RuntimeError, OSError)):
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    state.pop("log", None)  # FaCT stores its last training log beside the weights
    missing = [key for key in ("encoder.weight", "decoder.weight") if key not in state]
    if missing:
        raise UserError(f"no {missing} in the state dict (keys: {sorted(state)})", key="fact.sae.checkpoint", value=path,
                        fix="give a FaCT SAE checkpoint (encoder.weight, decoder.weight, k)")
    latents, in_dim = state["encoder.weight"].shape
    if in_dim != channels or tuple(state["decoder.weight"].shape) != (channels, latents):
        raise UserError(
            f"encoder.weight {tuple(state['encoder.weight'].shape)} and decoder.weight {tuple(state['decoder.weight'].shape)} "
            f"do not fit a layer of {channels} channels (expected ({latents}, {channels}) and ({channels}, {latents}))",
            key="fact.sae.checkpoint", value=path, fix="use the checkpoint trained on fact.layer of this backbone",
        )
    with user_error_for("fact.sae.checkpoint", path):
        return BiasFreeTopKSAE.from_fact_state_dict(state, k=None if "k" in state else k)


def run_sae(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None = None) -> SaeReport:
    """Train (or resume training) the SAE, or load a released one, and publish data/<name>/fact/sae.pt,
    metrics/fact_sae.json and (training) metrics/plots/fact_sae.csv."""
    settings, seed = config.fact.sae, config.fact.seed
    backbone = load_fact_backbone(config, layout, device)
    feats_store = open_store(layout.features(backbone.layer))
    feats = feats_store[FEATURES]
    manifest = read_manifest(layout.manifest)
    _, val_rows, _ = train_val_indices(manifest, config.fact.val_fraction, seed)
    labels = manifest.set_index("index").loc[val_rows, "label"].to_numpy(np.int64)
    val = _Val(backbone, feats, val_rows, labels, config.fact.batch_size)
    if settings.checkpoint is not None:
        return _publish_released(config, layout, device, ranks, val)

    store = open_store(layout.fact_vectors)
    vectors = store[VECTORS]
    channels = vectors.shape[1]
    latents, k = settings.n_latents(channels), settings.k
    if k > latents:
        raise UserError(f"k ({k}) > latents ({latents} = expansion {settings.expansion:g} x {channels} channels)",
                        key="fact.sae.k", value=k, fix="lower fact.sae.k or raise fact.sae.expansion")
    plan = EpochPlan(vectors.shape[0], settings.batch_size, settings.epochs, settings.warmup_epochs, settings.decay_epochs,
                     settings.dead_epochs)
    with user_error_for("fact.sae.batch_size", settings.batch_size, fix="lower it or raise fact.sae.buffer_shards"):
        stream = VectorStream(vectors, max(1, settings.batch_size // ranks.world_size), seed, settings.buffer_shards, ranks)
    fingerprint = params_hash(
        settings, {"seed": seed, "val_fraction": config.fact.val_fraction}, store.attrs["fingerprint"], feats_store.attrs["fingerprint"],
        source_hash(sae_module), source_hash(train_module), source_hash(sae_val_module), source_hash(sys.modules[__name__]),
    )
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
            channels, latents, k, aux_k=settings.aux_k_for(latents), aux_coef=settings.aux_coef,
            dead_after=plan.dead_after, generator=torch.Generator().manual_seed(seed),
        ).to(device)
        rows_per_shard = (vectors.shards or vectors.chunks)[0]
        model.fit_scale(torch.from_numpy(vectors[s : s + rows_per_shard]).to(device) for s in range(0, vectors.shape[0], rows_per_shard))
        train_config = TrainConfig(
            steps=plan.total_steps, lr=settings.lr, warmup_steps=plan.warmup_steps, decay_start=plan.decay_start,
            min_lr_factor=settings.min_lr_factor, grad_clip=settings.grad_clip, seed=seed,
        )
        state = TrainState.create(model, train_config, ranks)
        rows = []
    resumed_from, total = state.step, plan.total_steps
    batches = stream.batches(state.step)
    task = progress.add_task("sae", total=total, completed=state.step) if progress is not None else None
    while state.step < total:
        next_end = min(end for end in plan.epoch_ends if end > state.step)
        until = min(next_end, (state.step // settings.checkpoint_every + 1) * settings.checkpoint_every)
        log = train(state, batches, until=until)
        rows += log.rows()
        if state.step == next_end:  # FaCT's selection: spliced val accuracy, then val loss
            scores = val.score(state.model)
            state.model.train()
            rows[-1] |= {"val_acc": scores.accuracy, "val_loss": scores.loss}
            state.best.offer(state.step, scores.accuracy, scores.loss, state.model)
        if ranks.is_main:
            write_csv(log_path, pd.DataFrame(rows, columns=LOG_COLUMNS))  # the log first: a checkpoint never runs ahead of it
            state.save_checkpoint(checkpoint)
        if task is not None:
            progress.update(task, completed=state.step, description=f"sae (mse {log.mse[-1]:.4f})")

    model = state.model.eval()
    model.load_state_dict(state.best.state)
    scores = val.score(model)
    dead = float((model.tokens_since_fired >= model.dead_after).float().mean())
    report = SaeReport(latents, k, state.step, resumed_from, state.best.step, scores, dead, layout.fact_sae)
    if not ranks.is_main:  # every rank holds the same model; one publishes it
        return report
    _publish(layout, model, {"layer": backbone.layer, "model_id": store.attrs["model_id"], "fingerprint": fingerprint,
                             "steps": state.step, "kept_step": state.best.step},
             scores, {"epochs": settings.epochs, "steps": state.step, "steps_per_epoch": plan.steps_per_epoch,
                      "kept_step": state.best.step, "kept_epoch": state.best.step / plan.steps_per_epoch, "dead_pct": 100 * dead})
    write_csv(layout.fact_plot("sae"), pd.DataFrame(rows, columns=LOG_COLUMNS))
    checkpoint.unlink()
    log_path.unlink()
    remove_empty_scratch_dirs(checkpoint.parent)
    return report


def _publish_released(config: Params, layout: Layout, device: torch.device, ranks: Ranks, val: _Val) -> SaeReport:
    """Publish the released checkpoint fact.sae.checkpoint (module doc) with its val figures."""
    path = config.fact.sae.checkpoint
    model = load_released(path, val.feats.shape[1], config.fact.sae.k).to(device)
    scores = val.score(model)
    report = SaeReport(model.n_concepts, model.k, 0, 0, -1, scores, float("nan"), layout.fact_sae)
    if ranks.is_main:
        model_id = open_store(layout.features(val.backbone.layer)).attrs["model_id"]
        _publish(layout, model, {"layer": val.backbone.layer, "model_id": model_id, "released": str(path)}, scores, {"released": str(path)})
    return report


def _publish(layout: Layout, model: BiasFreeTopKSAE, record: dict[str, Any], scores: ValScores, extra: dict[str, Any]) -> None:
    """Write sae.pt (with `record`) and metrics/fact_sae.json (the val figures and `extra`)."""
    save_sae(layout.fact_sae, model, {**record, "fve_val": scores.fve})
    write_json(layout.fact_sae_metrics, {
        "n_latents": model.n_concepts, "k": model.k, "aux_k": model.aux_k,
        "val_acc_spliced": scores.accuracy, "val_loss": scores.loss, "fve_val": scores.fve,
        "l2_error_mean": scores.l2_error_mean, "l2_error_std": scores.l2_error_std, "val_images": scores.n_images, **extra,
    }, digits=6)
