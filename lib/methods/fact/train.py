"""Training loop for the bias-free TopK SAE: Adam, grad-clip, linear warm-up then cosine decay,
atomic checkpoints from which a killed run resumes to the same result as an uninterrupted one, and
the choice of the checkpoint to keep.

Epochs. FaCT states its schedule in epochs of the training vectors (warm-up 1, constant to 2, cosine
to 0 at 16; dead after half an epoch); `EpochPlan` turns those into steps for N vectors in batches
of B (an epoch is N / B steps, rounded at each boundary).

Selection. FaCT keeps the checkpoint with the best spliced val accuracy (evaluated every 2 epochs);
`Selection` keeps the best of the evaluations it is offered, ties going to the lower val loss (on the
toy world the spliced accuracy reaches 1.000 after an epoch, and then only the loss tells them apart).

Resuming. Everything that decides the next step lives in `TrainState` and goes into the checkpoint:
model (incl. the scale and dead-latent buffers), Adam moments, scheduler position, step and `rng`
(a CPU torch.Generator for the caller's batch order). Batches should be a function of the step
(and `rng`): pass `batches` as a callable `(step, rng) -> (B, C) tensor` and resuming is automatic;
an iterable must be positioned at `state.step` by the caller.

Under torchrun, a state created with several `ranks` trains through DDP: each rank passes its part
of every batch, the SAE's loss sums over the global batch (sae.py) and DDP averages the gradients,
so every rank holds the model one process would train on the concatenated batches.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lib.core.distributed import Ranks, data_parallel
from lib.methods.fact.sae import BiasFreeTopKSAE, SAELoss

__all__ = [
    "BatchFn",
    "EpochPlan",
    "Selection",
    "TrainConfig",
    "TrainLog",
    "TrainState",
    "WarmupCosine",
    "fraction_of_variance_explained",
    "train",
    "train_step",
]

BatchFn = Callable[[int, torch.Generator], Tensor]


class WarmupCosine:
    """LR factor for LambdaLR: linear warm-up to 1 over `warmup_steps`, constant until `decay_start`
    (default: end of warm-up), then cosine down to `min_factor` at `total_steps`. A class, not a
    closure, so the scheduler's state_dict is self-describing."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, decay_start: int | None = None,
                 min_factor: float = 0.0) -> None:
        decay_start = warmup_steps if decay_start is None else decay_start
        if not 0 <= warmup_steps <= decay_start <= total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps ({warmup_steps}) <= decay_start ({decay_start}) <= total_steps ({total_steps})"
            )
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor}")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.decay_start, self.min_factor = decay_start, min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the first step already learns (FaCT's step / warmup wastes step 0).
            return (step + 1) / self.warmup_steps
        if step < self.decay_start or self.total_steps == self.decay_start:
            return 1.0
        t = min(1.0, (step - self.decay_start) / (self.total_steps - self.decay_start))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class EpochPlan:
    """A schedule given in epochs of `n_vectors` training vectors, `batch_size` per step, in steps.

    FaCT: epochs 16, warm-up 1, decay from 2, dead after 0.5. Boundaries round to the nearest step;
    `epoch_ends` are the steps after which epoch 1, 2, ... is complete (and the last step)."""

    n_vectors: int
    batch_size: int
    epochs: float
    warmup_epochs: float = 1.0
    decay_epochs: float = 2.0
    dead_epochs: float = 0.5

    def __post_init__(self) -> None:
        if self.n_vectors < 1 or self.batch_size < 1 or self.epochs <= 0:
            raise ValueError(f"n_vectors, batch_size >= 1 and epochs > 0 required, got {self}")
        if not 0 <= self.warmup_epochs <= self.decay_epochs or self.dead_epochs <= 0:
            raise ValueError(f"need 0 <= warmup_epochs <= decay_epochs and dead_epochs > 0, got {self}")

    @property
    def steps_per_epoch(self) -> float:
        return self.n_vectors / self.batch_size

    def step_at(self, epochs: float) -> int:
        """The step count after `epochs` epochs (at least 1 for a positive count)."""
        return max(1, round(epochs * self.steps_per_epoch)) if epochs > 0 else 0

    @property
    def total_steps(self) -> int:
        return self.step_at(self.epochs)

    @property
    def warmup_steps(self) -> int:
        return min(self.step_at(self.warmup_epochs), self.total_steps)

    @property
    def decay_start(self) -> int:
        return min(max(self.step_at(self.decay_epochs), self.warmup_steps), self.total_steps)

    @property
    def dead_after(self) -> int:
        """Training vectors without being chosen by the top-k before a latent counts as dead."""
        return max(1, round(self.dead_epochs * self.n_vectors))

    @property
    def epoch_ends(self) -> tuple[int, ...]:
        ends = {min(self.step_at(e), self.total_steps) for e in range(1, math.floor(self.epochs) + 1)}
        return tuple(sorted(ends | {self.total_steps}))


@dataclass
class Selection:
    """The best evaluation offered so far and the model's state then (module doc: FaCT keeps the best
    spliced val accuracy; ties go to the lower val loss, and to the earlier step)."""

    step: int = -1
    accuracy: float = -math.inf
    loss: float = math.inf
    state: dict[str, Tensor] | None = None

    def offer(self, step: int, accuracy: float, loss: float, model: nn.Module) -> bool:
        """Keep `model`'s state if (accuracy, -loss) beats the best so far; whether it did."""
        if not (accuracy > self.accuracy or (accuracy == self.accuracy and loss < self.loss)):
            return False
        self.step, self.accuracy, self.loss = step, float(accuracy), float(loss)
        self.state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "accuracy": self.accuracy, "loss": self.loss, "state": self.state}


@dataclass
class TrainConfig:
    """Optimisation settings (FaCT: lr 1e-3 or 1e-4, warm-up one epoch, cosine after two)."""

    steps: int
    lr: float = 1e-3
    warmup_steps: int = 0
    decay_start: int | None = None
    min_lr_factor: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"steps >= 1, lr > 0 and grad_clip > 0 required, got {self}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


class _Objective(nn.Module):
    """The SAE's training loss as a module's forward, which DDP needs to train through."""

    def __init__(self, model: BiasFreeTopKSAE, ranks: Ranks) -> None:
        super().__init__()
        self.model, self.ranks = model, ranks

    def forward(self, x: Tensor) -> SAELoss:
        return self.model.loss(x, ranks=self.ranks)


@dataclass
class TrainState:
    """Model, Adam, LambdaLR(WarmupCosine), step and the batch-order generator; the torchrun ranks."""

    model: BiasFreeTopKSAE
    config: TrainConfig
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: torch.Generator
    step: int = 0
    ranks: Ranks = field(default_factory=Ranks)
    best: Selection = field(default_factory=Selection)  # what the caller chose to keep so far; checkpointed
    objective: nn.Module = field(init=False, repr=False)  # model.loss, through DDP under torchrun

    def __post_init__(self) -> None:
        self.objective = data_parallel(_Objective(self.model, self.ranks), self.ranks)

    @classmethod
    def create(cls, model: BiasFreeTopKSAE, config: TrainConfig, ranks: Ranks | None = None) -> TrainState:
        """Fresh optimiser, scheduler and rng (seeded by config.seed) for `model` (already placed on
        its device, scale already fitted)."""
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
        schedule = WarmupCosine(config.steps, config.warmup_steps, config.decay_start, config.min_lr_factor)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        rng = torch.Generator().manual_seed(config.seed)
        return cls(model, config, optimizer, scheduler, rng, ranks=ranks or Ranks())

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu", ranks: Ranks | None = None) -> TrainState:
        """Rebuild model and state from a checkpoint alone (its stored configs), on `device`."""
        ckpt = _read(path)
        model = BiasFreeTopKSAE(**ckpt["sae_config"]).to(device)
        config = TrainConfig(**{**ckpt["train_config"], "betas": tuple(ckpt["train_config"]["betas"])})
        state = cls.create(model, config, ranks)
        state._restore(ckpt)
        return state

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write the whole state to `path` atomically (temporary file in the same folder, fsync,
        os.replace): a run killed mid-write leaves the previous checkpoint intact."""
        payload = {
            "sae_config": self.model.config(),
            "train_config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.rng.get_state(),
            "step": self.step,
            "best": self.best.to_dict(),
        }
        _atomic_save(payload, Path(path))

    def load_checkpoint(self, path: str | os.PathLike[str]) -> TrainState:
        """Load a checkpoint into this state's existing objects (built with the same configs)."""
        self._restore(_read(path))
        return self

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt["sae_config"] != self.model.config():
            raise ValueError(f"checkpoint SAE config {ckpt['sae_config']} != model's {self.model.config()}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])  # moves moments to the params' device
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.rng.set_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.best = Selection(**ckpt["best"])


@dataclass
class TrainLog:
    """Per-step values of one `train` call (for a plot CSV)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def rows(self) -> list[dict[str, float]]:
        """One dict per step, keys as the fields."""
        keys = ("step", "loss", "mse", "aux", "dead_fraction", "lr")
        columns = [getattr(self, key) for key in keys]
        return [dict(zip(keys, values, strict=True)) for values in zip(*columns, strict=True)]


def train_step(state: TrainState, batch: Tensor) -> Tensor:
    """One optimisation step on `batch` (B, C); returns detached (loss, mse, aux, dead_fraction)."""
    model, optimizer = state.model, state.optimizer
    model.train()
    out = state.objective(batch.to(model.atoms.device, model.atoms.dtype))
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    model.remove_parallel_grad()
    torch.nn.utils.clip_grad_norm_(model.parameters(), state.config.grad_clip)
    optimizer.step()
    state.scheduler.step()
    model.renormalise_decoder()
    state.step += 1
    return torch.stack([out.loss.detach(), out.mse, out.aux, out.dead_fraction])


def train(
    state: TrainState,
    batches: BatchFn | Iterable[Tensor],
    until: int | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
) -> TrainLog:
    """Train from `state.step` up to `until` (default config.steps) and return the per-step log.

    `batches`: a callable (step, rng) -> (B, C), or an iterable positioned at state.step.
    With `checkpoint_path`, saves every `checkpoint_every` steps and at the end. Per-step values stay
    on the device until the end (one host sync) so the GPU is not stalled every step."""
    until = state.config.steps if until is None else until
    if until > state.config.steps:
        raise ValueError(f"until ({until}) > config.steps ({state.config.steps}): the schedule ends there")
    source: Iterator[Tensor] = (
        (batches(step, state.rng) for step in count(state.step)) if callable(batches) else iter(batches)
    )
    log = TrainLog()
    values: list[Tensor] = []
    while state.step < until:
        try:
            batch = next(source)
        except StopIteration:
            raise ValueError(f"batches ran out at step {state.step} before {until}") from None
        log.step.append(state.step)
        log.lr.append(float(state.scheduler.get_last_lr()[0]))
        values.append(train_step(state, batch))
        if checkpoint_path is not None and checkpoint_every and state.step % checkpoint_every == 0:
            state.save_checkpoint(checkpoint_path)
    if checkpoint_path is not None:
        state.save_checkpoint(checkpoint_path)
    if values:
        table = torch.stack(values).double().cpu().tolist()
        log.loss, log.mse, log.aux, log.dead_fraction = (list(column) for column in zip(*table, strict=True))
    return log


@torch.no_grad()
def fraction_of_variance_explained(model: BiasFreeTopKSAE, batches: Iterable[Tensor]) -> float:
    """1 - SSE / SST over all vectors of `batches` ((B, C) each) in one pass: SSE = sum ||x - x_hat||^2,
    SST = sum ||x - mean||^2 = sum ||x||^2 - ||sum x||^2 / n (running sums in float64, so the
    subtraction does not cancel catastrophically)."""
    device = model.atoms.device
    n = 0
    sum_x = sum_sq = sse = None
    for batch in batches:
        x = batch.to(device, model.atoms.dtype)
        err = (x - model(x)).double().square().sum()
        xd = x.double()
        bx, bsq = xd.sum(dim=0), xd.square().sum()
        sum_x, sum_sq, sse = (bx, bsq, err) if sum_x is None else (sum_x + bx, sum_sq + bsq, sse + err)
        n += x.shape[0]
    if n == 0:
        raise ValueError("fraction_of_variance_explained needs at least one non-empty batch")
    sst = sum_sq - sum_x.square().sum() / n
    return float(1.0 - sse / sst)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    # map_location cpu: load_state_dict copies into the live tensors' devices.
    return torch.load(Path(path), map_location="cpu", weights_only=True)
