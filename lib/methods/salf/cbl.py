"""SALF-CBM concept bottleneck: features -> G x G concept maps, trained with the cubic cosine loss.

A *batch source* is a zero-argument callable returning a fresh iterator of
(sampled features (B, C, G, G), P (B, M, G, G)) batches — features already sampled at the grid
cells (:meth:`ConceptBottleneck.sample`) — so training can run several epochs over a stream (e.g.
shuffled shards of a Zarr store) with bounded memory. Whether P was materialised or is computed on
the fly is the source's business.

Under torchrun (`ranks` with several ranks) each rank's source yields its part of every global
batch; the loss centres and normalises across the global batch (lib.core.distributed.gather_batch)
and DDP averages the gradients, so a step equals the one-process step on the concatenated batch,
and the val statistics are reduced over ranks so every rank takes the same early-stopping decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.core.distributed import Ranks, data_parallel, gather_batch, reduce_
from lib.methods.salf.model import ConceptBottleneck

__all__ = [
    "BatchSource",
    "STEP_UNITS",
    "concept_scores",
    "step_bytes",
    "cubic_cosine_loss",
    "cubic_cosine_similarity",
    "filter_concepts",
    "train_bottleneck",
]

BatchSource = Callable[[], Iterator[tuple[Tensor, Tensor]]]
Progress = Callable[[int, dict[str, float]], None]

# Peak fp32 tensors of one (B, M, G, G) size live during a training step: P, the prediction, the
# stacked pair and its centred copy, the cubes and their norms, and their gradients in backward.
# Measured with torch's MemTracker on fake tensors at B = 4096, M = 4751, G = 7: 14.0 inside
# the step plus the P batch (tests/test_salf_cbl.py checks the bound at small shapes).
STEP_UNITS = 15


def step_bytes(batch: int, n_concepts: int, channels: int, grid: int) -> int:
    """Peak bytes of one bottleneck training step on a batch of `batch` images (the global batch:
    under torchrun the loss runs on the gathered batch): STEP_UNITS (B, M, G, G) fp32 tensors, the
    sampled features (B, C, G, G) and the conv's weight, gradient and two Adam moments."""
    cells = grid * grid
    return 4 * (STEP_UNITS * batch * n_concepts * cells + batch * channels * cells + 4 * n_concepts * channels)


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both be (B, M, G, G) with equal shapes, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.shape[0] < 2:
        raise ValueError(f"need a batch of at least 2 images to centre across it, got B={pred.shape[0]}")


def _cube(centred: Tensor, scale: Tensor) -> Tensor:
    # cos^3 is invariant to a positive per-column scale, so dividing by one first changes nothing
    # but keeps cubes (and their squares in the norm) of tiny deviations out of float underflow;
    # CLIP cosines vary by ~1e-2 across images. The scale is detached: by that same invariance
    # its gradient contribution is exactly zero.
    return (centred / scale.detach().clamp_min(torch.finfo(centred.dtype).tiny)) ** 3


def cubic_cosine_similarity(pred: Tensor, target: Tensor) -> Tensor:
    """Cubic cosine similarity (M, G, G) of pred and target (B, M, G, G) across the batch.

    Per concept and location: centre over the B images, cube, L2-normalise, dot. A column with
    zero variance has no direction and scores 0.
    """
    _check_pair(pred, target)
    pair = torch.stack([pred.to(torch.float32), target.to(torch.float32)])  # (2, B, M, G, G)
    centred = pair - pair.mean(dim=1, keepdim=True)
    cubes = F.normalize(_cube(centred, centred.abs().amax(dim=1, keepdim=True)), dim=1)
    return (cubes[0] * cubes[1]).sum(dim=0)


def cubic_cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Scalar loss: minus the mean of :func:`cubic_cosine_similarity` over concepts and locations."""
    return -cubic_cosine_similarity(pred, target).mean()


@torch.no_grad()
def concept_scores(model: ConceptBottleneck, val_batches: BatchSource, ranks: Ranks | None = None) -> Tensor:
    """Val cos^3 per concept (M,) on the model's device: the mean over the G x G locations.

    Exact over the whole val set, not a mean of batch scores: pass 1 takes each column's mean
    and range, pass 2 sums the centred cubes with those global statistics (float64 sums). Under
    torchrun each rank passes its part of val and the statistics are reduced over `ranks`.
    """
    model.eval()
    ranks = ranks or Ranks()
    device = model.conv.weight.device

    def pairs() -> Iterator[Tensor]:
        for sampled, target in val_batches():
            pred = model.project(sampled.to(device))
            if target.shape != pred.shape:
                raise ValueError(f"val target shape {tuple(target.shape)} does not match pred {tuple(pred.shape)}")
            yield torch.stack([pred, target.to(device, torch.float32)])  # (2, B, M, G, G)

    shape = (2, model.conv.out_channels, model.grid, model.grid)
    n = torch.zeros((), dtype=torch.float64, device=device)
    sums = torch.zeros(shape, dtype=torch.float64, device=device)
    lows = torch.full(shape, torch.inf, device=device)
    highs = torch.full(shape, -torch.inf, device=device)
    for pair in pairs():
        sums += pair.sum(dim=1, dtype=torch.float64)
        lows, highs = torch.minimum(lows, pair.amin(dim=1)), torch.maximum(highs, pair.amax(dim=1))
        n += pair.shape[1]
    for value, op in ((n, "sum"), (sums, "sum"), (lows, "min"), (highs, "max")):
        reduce_(value, ranks, op)
    if n.item() < 2:
        raise ValueError(f"val_batches must yield at least 2 images in total, got {int(n.item())}")
    mean = (sums / n).to(torch.float32).unsqueeze(1)
    scale = (highs - lows).unsqueeze(1)  # >= max |x - mean|; it only has to keep cubes in range
    dot = torch.zeros(sums.shape[1:], dtype=torch.float64, device=device)
    norms = torch.zeros_like(sums)
    for pair in pairs():
        cubes = _cube(pair - mean, scale)
        dot += (cubes[0] * cubes[1]).sum(dim=0, dtype=torch.float64)
        norms += cubes.square().sum(dim=1, dtype=torch.float64)
    reduce_(dot, ranks)
    reduce_(norms, ranks)
    cos3 = dot / norms.sqrt().prod(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    return cos3.to(torch.float32).flatten(1).mean(dim=1)


def train_bottleneck(
    train_batches: BatchSource,
    val_batches: BatchSource,
    in_channels: int,
    n_concepts: int,
    positions: Tensor | None,
    *,
    lr: float = 1e-3,
    max_steps: int = 1000,
    eval_every: int = 20,
    patience: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> tuple[ConceptBottleneck, dict]:
    """Train a :class:`ConceptBottleneck` (cells at `positions`, see its doc) with Adam on the cubic
    cosine loss, early-stopped on val. Under torchrun, with DDP over `ranks` (module doc): the
    sources then yield this rank's part of each batch, the same number of images on every rank.

    Every `eval_every` steps (and at the last) the exact val loss, -mean(concept_scores), is
    taken; training stops after `patience` evaluations without improvement and the best weights
    are returned. The train source is restarted whenever it runs out (a new epoch).

    Returns (model on `device`, eval mode, best weights; history) where history holds
    "step"/"train_loss" (every step), "val_step"/"val_loss", "best_step", "best_val_loss" and
    "stopped_early".
    """
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every), ("patience", patience)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device, ranks = torch.device(device), ranks or Ranks()
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        model = ConceptBottleneck(in_channels, n_concepts, positions)
    model.to(device)
    project = data_parallel(_Projection(model), ranks)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    history: dict = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    window: list[Tensor] = []  # train losses since the last eval, read back in one sync
    best_loss, best_step, best_weight, bad_evals = float("inf"), 0, model.conv.weight.detach().clone(), 0
    batches, fresh = train_batches(), True
    step = 0
    while step < max_steps:
        try:
            sampled, target = next(batches)
        except StopIteration:
            if fresh:
                raise ValueError("train_batches yielded no batches") from None
            batches, fresh = train_batches(), True
            continue
        fresh = False
        model.train()
        pred = project(sampled.to(device, non_blocking=True))
        loss = cubic_cosine_loss(gather_batch(pred, ranks), gather_batch(target.to(device, non_blocking=True), ranks))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        window.append(loss.detach())
        if step % eval_every and step != max_steps:
            continue
        history["step"].extend(range(step - len(window) + 1, step + 1))
        history["train_loss"].extend(torch.stack(window).tolist())
        window.clear()
        val_loss = -concept_scores(model, val_batches, ranks).mean().item()
        history["val_step"].append(step)
        history["val_loss"].append(val_loss)
        if progress is not None:
            progress(step, {"train_loss": history["train_loss"][-1], "val_loss": val_loss})
        if val_loss < best_loss:
            best_loss, best_step, bad_evals = val_loss, step, 0
            best_weight = model.conv.weight.detach().clone()
        else:
            bad_evals += 1
            if bad_evals >= patience:
                break
    with torch.no_grad():
        model.conv.weight.copy_(best_weight)
    model.eval()
    history.update(best_step=best_step, best_val_loss=best_loss, stopped_early=step < max_steps)
    return model, history


class _Projection(nn.Module):
    """The bottleneck's projection as a module's forward, which DDP needs to train through."""

    def __init__(self, bottleneck: ConceptBottleneck) -> None:
        super().__init__()
        self.bottleneck = bottleneck

    def forward(self, sampled: Tensor) -> Tensor:
        return self.bottleneck.project(sampled)


def filter_concepts(model: ConceptBottleneck, scores: Tensor, threshold: float) -> tuple[ConceptBottleneck, Tensor]:
    """Drop concepts whose val cos^3 score is below `threshold` (LF-CBM's interpretability cut).

    Returns (a new bottleneck with only the kept rows of the conv, kept indices (M',) int64).
    """
    n_concepts = model.conv.out_channels
    if scores.shape != (n_concepts,):
        raise ValueError(f"scores must have shape ({n_concepts},), got {tuple(scores.shape)}")
    keep = torch.nonzero(scores >= threshold).flatten()
    if keep.numel() == 0:
        raise ValueError(
            f"no concept reaches threshold={threshold} (best val cos^3 is {scores.max().item():.4f}); "
            "lower the threshold or train longer"
        )
    pruned = ConceptBottleneck(model.conv.in_channels, keep.numel(), model.positions).to(model.conv.weight.device)
    with torch.no_grad():
        pruned.conv.weight.copy_(model.conv.weight[keep.to(model.conv.weight.device)])
    return pruned.eval(), keep.cpu()
