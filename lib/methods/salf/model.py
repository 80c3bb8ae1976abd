"""SALF-CBM's concept bottleneck: a feature map resized to the prompt grid, then a 1x1 conv to M concept maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConceptBottleneck", "resize_to_grid"]


class ConceptBottleneck(nn.Module):
    """Bilinear resize of a feature map to grid x grid, then a bias-free 1x1 conv to M concept maps."""

    def __init__(self, in_channels: int, n_concepts: int, grid: int) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("n_concepts", n_concepts), ("grid", grid)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.grid = grid
        self.conv = nn.Conv2d(in_channels, n_concepts, kernel_size=1, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        """Map features (B, C, H, W) of any float dtype to concept maps (B, M, G, G) float32."""
        if features.ndim != 4 or features.shape[1] != self.conv.in_channels:
            raise ValueError(
                f"features must have shape (B, {self.conv.in_channels}, H, W), got {tuple(features.shape)}"
            )
        return self.conv(resize_to_grid(features, self.grid).to(self.conv.weight.dtype))


def resize_to_grid(features: Tensor, grid: int) -> Tensor:
    """Features (B, C, H, W) as float32, bilinearly resized to (B, C, grid, grid) (the bottleneck's
    first step; callers may apply it ahead of time, e.g. to cache smaller inputs)."""
    x = features.to(torch.float32)
    if x.shape[-2:] != (grid, grid):
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x
