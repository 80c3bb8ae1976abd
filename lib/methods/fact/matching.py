"""Which SAE latent is which ground-truth concept: SAE latents have no names, so `evaluate` scores
the latent that best matches each ground-truth concept on the val split.

The rule. For ground-truth concept k and latent j, r_jk is the Pearson correlation, over every cell
of the layer's feature map of every val image, between the latent's code z_j at that cell and the
share of the cell that concept k's mask covers (the mask average-pooled to the feature grid, which
is taken to tile the image). Concept k's latent is argmax_j r_jk, and k counts as "found" when that
r reaches fact.match_threshold. One number per pair rewards a latent for being on in the images that
show the concept (presence) and at the cells where it lies (the map); it needs one streaming pass
of sums in float64, no per-cell storage. Several concepts may pick the same latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LatentCorrelation", "Matching"]


class LatentCorrelation:
    """Streaming Pearson correlation (J, K) between J latents' codes and K concepts' mask shares per cell."""

    def __init__(self, n_latents: int, n_concepts: int) -> None:
        self.n = 0
        zeros = torch.zeros  # float64 sums on the CPU: tiny, and exact enough for any N
        self.sum_z, self.sum_zz = zeros(n_latents, dtype=torch.float64), zeros(n_latents, dtype=torch.float64)
        self.sum_m, self.sum_mm = zeros(n_concepts, dtype=torch.float64), zeros(n_concepts, dtype=torch.float64)
        self.sum_zm = zeros(n_latents, n_concepts, dtype=torch.float64)

    def add(self, codes: Tensor, masks: Tensor) -> None:
        """codes (B, h, w, J) of a batch's feature maps; masks (B, K, H, W) bool of the same images."""
        b, h, w, _ = codes.shape
        if masks.ndim != 4 or masks.shape[0] != b or masks.shape[1] != self.sum_m.numel():
            raise ValueError(f"masks must be (B={b}, K={self.sum_m.numel()}, H, W), got {tuple(masks.shape)}")
        shares = F.adaptive_avg_pool2d(masks.float(), (h, w)).permute(0, 2, 3, 1).reshape(b * h * w, -1).double()
        z = codes.reshape(b * h * w, -1).double()
        self.n += z.shape[0]
        self.sum_z += z.sum(dim=0).cpu()
        self.sum_zz += z.square().sum(dim=0).cpu()
        self.sum_m += shares.sum(dim=0).cpu()
        self.sum_mm += shares.square().sum(dim=0).cpu()
        self.sum_zm += (z.T @ shares).cpu()

    def correlation(self) -> Tensor:
        """r (J, K) float64; 0 where a latent or a concept never varies (never on, or everywhere)."""
        if self.n == 0:
            raise ValueError("no cells added")
        mean_z, mean_m = self.sum_z / self.n, self.sum_m / self.n
        cov = self.sum_zm / self.n - mean_z[:, None] * mean_m[None, :]
        var_z = (self.sum_zz / self.n - mean_z.square()).clamp_min(0)
        var_m = (self.sum_mm / self.n - mean_m.square()).clamp_min(0)
        scale = (var_z[:, None] * var_m[None, :]).sqrt()
        return torch.where(scale > 0, cov / scale.clamp_min(1e-300), torch.zeros_like(cov))


@dataclass(frozen=True)
class Matching:
    """Per ground-truth concept (in dataset.json order): its latent and their correlation; and per
    latent, the ground-truth concept it correlates with best (the other direction of the same r)."""

    names: tuple[str, ...]
    latents: tuple[int, ...]
    scores: tuple[float, ...]
    threshold: float
    latent_concepts: tuple[int, ...]  # per latent: index into `names`
    latent_scores: tuple[float, ...]

    @classmethod
    def from_correlation(cls, correlation: Tensor, names: Sequence[str], threshold: float) -> Matching:
        """Both argmaxes of r (J latents, K concepts)."""
        scores, latents = correlation.max(dim=0)
        latent_scores, latent_concepts = correlation.max(dim=1)
        return cls(
            tuple(names), tuple(latents.tolist()), tuple(scores.tolist()), threshold,
            tuple(latent_concepts.tolist()), tuple(latent_scores.tolist()),
        )

    @property
    def found(self) -> int:
        """Concepts whose latent's correlation reaches the threshold."""
        return sum(score >= self.threshold for score in self.scores)

    @property
    def mean_score(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")

    def label(self, latent: int) -> str | None:
        """'<concept> r=<score>' when the latent's best concept reaches the threshold, else None."""
        score = self.latent_scores[latent]
        return f"{self.names[self.latent_concepts[latent]]} r={score:.2f}" if score >= self.threshold else None

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": "a concept's latent: argmax over latents of the Pearson correlation between the latent's code and the "
            "concept mask's share of each feature-map cell, over every cell of every val image (lib/methods/fact/matching.py)",
            "split": "val",
            "threshold": self.threshold,
            "found": self.found,
            "mean_score": self.mean_score,
            "concepts": [
                {"concept": name, "latent": latent, "score": score, "found": score >= self.threshold}
                for name, latent, score in zip(self.names, self.latents, self.scores, strict=True)
            ],
            "latents": [
                {"latent": j, "concept": self.names[k], "score": score}
                for j, (k, score) in enumerate(zip(self.latent_concepts, self.latent_scores, strict=True))
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Matching:
        rows, latents = data["concepts"], data["latents"]
        names = tuple(r["concept"] for r in rows)
        index = {name: k for k, name in enumerate(names)}
        return cls(
            names, tuple(int(r["latent"]) for r in rows), tuple(float(r["score"]) for r in rows), float(data["threshold"]),
            tuple(index[r["concept"]] for r in latents), tuple(float(r["score"]) for r in latents),
        )
