"""SALF-CBM's concept bottleneck: the feature map sampled at the prompt grid, then a 1x1 conv to M concept maps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lib.kernels.registration import sample_features

__all__ = ["ConceptBottleneck"]


class ConceptBottleneck(nn.Module):
    """Sample a feature map at the G x G prompt grid, then a bias-free 1x1 conv to M concept maps.

    `positions` (G, G, 2) are the cells' grid_sample coordinates in the backbone's input
    (lib.kernels.registration.Registration.feature_grid). None makes the non-spatial bottleneck of
    LF-CBM: the feature map is average-pooled to one cell (maps (B, M, 1, 1)).
    """

    def __init__(self, in_channels: int, n_concepts: int, positions: Tensor | None) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("n_concepts", n_concepts)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if positions is not None and (positions.ndim != 3 or positions.shape[0] != positions.shape[1] or positions.shape[2] != 2):
            raise ValueError(f"positions must have shape (G, G, 2), got {tuple(positions.shape)}")
        self.register_buffer("positions", None if positions is None else positions.to(torch.float32))
        self.conv = nn.Conv2d(in_channels, n_concepts, kernel_size=1, bias=False)

    @property
    def grid(self) -> int:
        """G: the side of the concept maps (1 for the non-spatial bottleneck)."""
        return 1 if self.positions is None else self.positions.shape[0]

    def sample(self, features: Tensor) -> Tensor:
        """Features (B, C, h, w) of any float dtype at the grid cells: (B, C, G, G) float32."""
        if features.ndim != 4 or features.shape[1] != self.conv.in_channels:
            raise ValueError(
                f"features must have shape (B, {self.conv.in_channels}, h, w), got {tuple(features.shape)}"
            )
        if self.positions is None:
            return features.to(torch.float32).mean(dim=(2, 3), keepdim=True)
        return sample_features(features, self.positions)

    def project(self, sampled: Tensor) -> Tensor:
        """Concept maps (B, M, G, G) float32 of already sampled features (B, C, G, G)."""
        return self.conv(sampled.to(self.conv.weight.dtype))

    def forward(self, features: Tensor) -> Tensor:
        """Map features (B, C, h, w) of any float dtype to concept maps (B, M, G, G) float32."""
        return self.project(self.sample(features))
