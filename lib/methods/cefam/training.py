"""Training CE-FAM's translator: pooled backbone features z_cat -> the CLIP image embedding.

Data come as *epoch sources*: `source(epoch)` returns an iterator of (z_cat (B, C), embedding
(B, D)) batches, shuffled from (seed, epoch) alone, so a resumed run sees exactly the batches an
uninterrupted one would. A split whose arrays fit in `in_memory_mb` is read once and kept on the
device; a larger one streams from its stores shard by shard (lib/core/streams.py).

The loop follows the paper (§4.1) and the authors' train.py: the loss of translator.py
(MSE to the embedding + lam * MSE of the concept scores), the learning rate multiplied by
`plateau_factor` after `plateau_patience` epochs without a better val loss, early stopping after
`patience` such epochs, and the weights of the best val epoch kept. After every epoch the whole
training state (weights, optimizer, scheduler, best weights, history) goes to a checkpoint file;
a run started with the same fingerprint resumes from it.

Under torchrun (`ranks` with several ranks) the translator trains with DDP: each rank's sources
yield its part of the data, every rank takes the same number of steps per epoch, the loss (means
over the batch) is averaged over ranks by DDP, the val statistics are summed over ranks so every
rank takes the same schedule and stopping decisions, and rank 0 writes the checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import Tensor

from lib.core.distributed import Ranks, data_parallel, in_lockstep, reduce_
from lib.core.outputs import write_atomic
from lib.core.streams import batch_source, read_rows
from lib.methods.cefam.translator import Translator, concept_scores, translator_loss

__all__ = ["EpochSource", "TrainSettings", "evaluate_translator", "split_source", "train_translator"]

EpochSource = Callable[[int], Iterator[tuple[Tensor, Tensor]]]
Progress = Callable[[int, dict[str, float]], None]


def _memory_source(z: Tensor, emb: Tensor, batch_size: int, shuffle: bool, seed: int) -> EpochSource:
    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        n = z.shape[0]
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        order = torch.from_numpy(order).to(z.device)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            yield z[rows], emb[rows]

    return batches


def split_source(
    z: zarr.Array,
    emb: zarr.Array,
    rows: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    in_memory_mb: float = 1024.0,
    norm: zarr.Array | None = None,
) -> EpochSource:
    """Batches of (z_cat, embedding) float32 over the store rows `rows` of two row-aligned arrays
    (same shard size): held on `device` when they fit in `in_memory_mb`, else streamed. With
    `norm` (N,), a third row-aligned array, the embeddings are multiplied by it row by row (unit
    embeddings times their raw norms: the raw embeddings)."""
    size_mb = len(rows) * (z.shape[1] + emb.shape[1]) * 4 / 2**20
    arrays = {"z": z, "emb": emb} | ({"norm": norm} if norm is not None else {})
    if size_mb <= in_memory_mb:
        rows = np.sort(rows)
        held = {key: torch.from_numpy(read_rows(array, rows)).to(device, torch.float32) for key, array in arrays.items()}
        return _memory_source(held["z"], _scaled(held), batch_size, shuffle, seed)

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        # a fresh source per epoch: batch_source draws its order from (seed, pass 0), so the epoch goes into the seed
        source = batch_source(arrays, rows, batch_size, shuffle=shuffle, seed=seed * 1_000_003 + epoch, device=device)
        for batch in source():
            yield batch["z"].float(), _scaled({key: value.float() for key, value in batch.items()})

    return batches


def _scaled(batch: dict[str, Tensor]) -> Tensor:
    return batch["emb"] * batch["norm"][:, None] if "norm" in batch else batch["emb"]


@dataclass(frozen=True)
class TrainSettings:
    """The cefam.translator params the loop uses."""

    lam: float = 1e-3
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_epochs: int = 150
    plateau_patience: int = 4
    plateau_factor: float = 0.1
    patience: int = 10


def _optimizer(model: Translator, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


@torch.no_grad()
def evaluate_translator(
    model: Translator, source: EpochSource, text_emb: Tensor | None, lam: float, ranks: Ranks | None = None
) -> dict[str, float]:
    """Over one pass of `source`: the mean loss, the mean cosine of predicted and true embeddings,
    and with text_emb (M, D) "agreement", the share of images whose top-1 concept is the teacher's,
    and "corr", the mean over images of the Pearson correlation of their M concept scores with the
    teacher's (the top-1 alone is fragile where the teacher's best concepts nearly tie). Under
    torchrun each rank passes its part of the split and the sums run over `ranks`."""
    model.eval()
    totals = {"loss": 0.0, "cos": 0.0, "agreement": 0.0, "corr": 0.0}
    n = 0
    for z, emb in source(0):
        pred = model(z)
        b = z.shape[0]
        totals["loss"] += translator_loss(pred, emb, text_emb, lam, model.scale).item() * b
        totals["cos"] += F.cosine_similarity(pred, emb, dim=1).sum().item()
        if text_emb is not None:
            ours, theirs = concept_scores(pred, text_emb), concept_scores(emb, text_emb)
            totals["agreement"] += (ours.argmax(dim=1) == theirs.argmax(dim=1)).sum().item()
            centred = [s - s.mean(dim=1, keepdim=True) for s in (ours, theirs)]
            totals["corr"] += F.cosine_similarity(*centred, dim=1).sum().item()
        n += b
    summed = reduce_(torch.tensor([*totals.values(), n], dtype=torch.float64, device=model.scale.device), ranks or Ranks()).tolist()
    totals, n = dict(zip(totals, summed[:-1])), summed[-1]
    if n == 0:
        raise ValueError("the evaluation source yielded no images")
    out = {key: value / n for key, value in totals.items()}
    if text_emb is None:
        del out["agreement"], out["corr"]
    return out


def _state(model, optimizer, scheduler, best, history, epoch, fingerprint) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "epoch": epoch,  # epochs finished
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best": best,
        "history": history,
    }


def train_translator(
    model: Translator,
    train: EpochSource,
    val: EpochSource,
    text_emb: Tensor | None,
    settings: TrainSettings,
    *,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> tuple[Translator, dict[str, Any]]:
    """Train `model` in place; return it with the weights of its best val epoch, and the history
    {"epoch", "train_loss", "val_loss", "lr": per-epoch lists; "best_epoch", "best_val_loss",
    "stopped_early", "resumed_from"}.

    text_emb (M, D) enters the similarity loss (None with lam = 0). `checkpoint`: where the
    training state goes after every epoch; an existing one with the same `fingerprint` is
    resumed (one with another fingerprint is ignored and overwritten). `ranks`: DDP under torchrun
    (module doc).
    """
    ranks = ranks or Ranks()
    net = data_parallel(model, ranks)
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.plateau_factor, patience=settings.plateau_patience - 1, threshold=0.0
    )
    history: dict[str, Any] = {"epoch": [], "train_loss": [], "val_loss": [], "lr": []}
    best: dict[str, Any] = {"epoch": -1, "val_loss": float("inf"), "weights": copy.deepcopy(model.state_dict())}
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=model.scale.device, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            best, history, start = state["best"], state["history"], state["epoch"]
    resumed_from = start
    for epoch in range(start, settings.max_epochs):
        if epoch - best["epoch"] > settings.patience:
            break  # a resumed run that had already stopped
        model.train()
        sums = torch.zeros(2, dtype=torch.float64, device=model.scale.device)  # loss * images, images
        for z, emb in in_lockstep(train(epoch), ranks):
            loss = translator_loss(net(z), emb, text_emb, settings.lam, model.scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums[0] += loss.detach() * z.shape[0]
            sums[1] += z.shape[0]
        total, n = reduce_(sums, ranks).tolist()
        val_loss = evaluate_translator(model, val, text_emb, settings.lam, ranks)["loss"]
        history["epoch"].append(epoch)
        history["train_loss"].append(total / max(n, 1))
        history["val_loss"].append(val_loss)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        # threshold 0: the schedule counts epochs without a new best exactly as early stopping does
        scheduler.step(val_loss)
        if val_loss < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": val_loss, "weights": copy.deepcopy(model.state_dict())}
        if checkpoint is not None and ranks.is_main:
            state = _state(model, optimizer, scheduler, best, history, epoch + 1, fingerprint)
            write_atomic(checkpoint, lambda tmp, state=state: torch.save(state, tmp))
        if progress is not None:
            progress(epoch + 1, {"val_loss": val_loss})
        if epoch - best["epoch"] >= settings.patience:
            break
    model.load_state_dict(best["weights"])
    model.eval()
    stopped_early = bool(history["epoch"]) and history["epoch"][-1] + 1 < settings.max_epochs
    return model, {
        **history,
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "stopped_early": stopped_early,
        "resumed_from": resumed_from,
    }
