"""Concept maps -> final-layer inputs: spatial pooling to c* and train-set standardisation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["POOLING_METHODS", "Pooling", "Standardiser", "pool_concepts"]

Pooling = Literal["avg", "max", "softmax"]
POOLING_METHODS: tuple[str, ...] = get_args(Pooling)


def pool_concepts(maps: Tensor, method: Pooling) -> Tensor:
    """Pool concept maps (B, M, G, G) over space to global activations c* (B, M).

    "avg" is the mean, "max" the maximum and "softmax" the official demo's soft maximum
    sum(x * softmax(x)) over the G*G locations of each map.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (B, M, G, G), got {tuple(maps.shape)}")
    flat = maps.flatten(2)
    if method == "avg":
        return flat.mean(dim=2)
    if method == "max":
        return flat.amax(dim=2)
    if method == "softmax":
        return (flat * flat.softmax(dim=2)).sum(dim=2)
    raise ValueError(f"method must be one of {POOLING_METHODS}, got {method!r}")


@dataclass(frozen=True)
class Standardiser:
    """Per-concept affine map (c* - mean) / std with statistics of the train split."""

    mean: Tensor  # (M,) float32
    std: Tensor  # (M,) float32, > 0

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise ValueError(
                f"mean and std must be (M,) vectors of equal length, got {tuple(self.mean.shape)} "
                f"and {tuple(self.std.shape)}"
            )
        if not bool((self.std > 0).all()):
            raise ValueError("std must be > 0 everywhere")

    @classmethod
    def fit(cls, batches: Iterable[Tensor]) -> Standardiser:
        """Population mean/std per column of a stream of (B, M) batches, one pass, float64 sums.

        Sums are shifted by the first batch's mean, which keeps sum-of-squares accurate when
        |mean| >> std. A zero-variance concept gets std 1: it standardises to 0, not NaN.
        """
        shift = total = total_sq = None
        count = 0
        for batch in batches:
            if batch.ndim != 2:
                raise ValueError(f"batches must have shape (B, M), got {tuple(batch.shape)}")
            x = batch.to(torch.float64)
            if shift is None:
                shift = x.mean(dim=0)
                total = torch.zeros_like(shift)
                total_sq = torch.zeros_like(shift)
            elif x.shape[1] != shift.shape[0]:
                raise ValueError(f"batches disagree on M: {shift.shape[0]} then {x.shape[1]}")
            centred = x - shift
            total += centred.sum(dim=0)
            total_sq += centred.square().sum(dim=0)
            count += x.shape[0]
        if shift is None or count == 0:
            raise ValueError("batches is empty; need at least one (B, M) batch with B >= 1")
        offset = total / count
        var = (total_sq / count - offset.square()).clamp_min(0)
        std = var.sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls(mean=(shift + offset).to(torch.float32), std=std.to(torch.float32))

    def __call__(self, pooled: Tensor) -> Tensor:
        """Standardise c* (..., M) on its own device."""
        if pooled.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"pooled has {pooled.shape[-1]} concepts, the standardiser {self.mean.shape[0]}")
        mean = self.mean.to(pooled.device)
        std = self.std.to(pooled.device)
        return (pooled.to(torch.float32) - mean) / std

    def to(self, device: torch.device | str) -> Standardiser:
        """The same statistics on `device`."""
        return Standardiser(mean=self.mean.to(device), std=self.std.to(device))
