"""SALF-CBM's classifier after the bottleneck: pooling, train standardisation, final layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lib.core.errors import UserError
from lib.methods.salf.pooling import Pooling, Standardiser, pool_concepts

__all__ = ["ConceptClassifier", "names_message"]


def names_message(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in total)" if len(names) > limit else "")


@dataclass(frozen=True)
class ConceptClassifier:
    """Everything after the bottleneck: c* = pool(c(x)), standardise, logits = W c* + b."""

    pooling: Pooling
    standardiser: Standardiser
    weight: Tensor  # (K, M)
    bias: Tensor  # (K,)
    concept_names: tuple[str, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        k, m = self.weight.shape
        if self.bias.shape != (k,) or self.standardiser.mean.shape != (m,):
            raise ValueError(
                f"weight {tuple(self.weight.shape)}, bias {tuple(self.bias.shape)} and standardiser "
                f"{tuple(self.standardiser.mean.shape)} disagree; need (K, M), (K,) and (M,)"
            )
        if len(self.concept_names) != m or len(self.class_names) != k:
            raise ValueError(
                f"got {len(self.concept_names)} concept names for M={m} and "
                f"{len(self.class_names)} class names for K={k}"
            )

    def activations(self, maps: Tensor) -> Tensor:
        """Standardised global activations c* (B, M) of concept maps (B, M, G, G)."""
        if maps.ndim != 4 or maps.shape[1] != self.weight.shape[1]:
            raise ValueError(f"maps must have shape (B, {self.weight.shape[1]}, G, G), got {tuple(maps.shape)}")
        return self.standardiser(pool_concepts(maps.to(torch.float32), self.pooling))

    def classify(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """(standardised c* (B, M), logits (B, K)) of concept maps (B, M, G, G)."""
        activations = self.activations(maps)
        return activations, activations @ self.weight.to(maps.device).T + self.bias.to(maps.device)

    def standardised_maps(self, maps: Tensor) -> Tensor:
        """Maps put on the c* scale per concept: (c - mean) / std (exactly consistent with c* for avg
        pooling). The cos^3 loss leaves each concept's scale and offset free, so raw maps of
        different concepts are not comparable."""
        mean, std = self.standardiser.mean.to(maps.device), self.standardiser.std.to(maps.device)
        return (maps.to(torch.float32) - mean[:, None, None]) / std[:, None, None]

    def concept_index(self, concept: int | str) -> int:
        """Index of a concept given by index or name."""
        if isinstance(concept, str):
            if concept not in self.concept_names:
                raise UserError(f"unknown concept {concept!r}; known: {names_message(self.concept_names)}")
            return self.concept_names.index(concept)
        if not 0 <= concept < len(self.concept_names):
            raise UserError(f"concept index {concept} out of range [0, {len(self.concept_names)})")
        return int(concept)
