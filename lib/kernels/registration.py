"""One geometry for SALF-CBM's concept grid: where grid cell (h, w) lies in every view of an image.

Cell (h, w) of P is CLIP's score for a red circle centred on pixel (d (h + 1), d (w + 1)) of CLIP's
input, d = floor(S / (G + 1)) (lib.kernels.rings.grid_centers). CLIP and the backbone see the stored
image through their own preprocessing (lib.kernels.preprocess.Preprocess: resize, centre crop or
pad), so that circle centre lies elsewhere in the stored image and in the backbone's input. A
:class:`Registration` maps it through both and is the single source of truth for

- the bottleneck's input: the backbone's feature map sampled bilinearly at the circle centres
  (:meth:`Registration.feature_grid`, :func:`sample_features`), not resized to G x G, which would
  put cell (h, w) at ((h + 1/2) / G) of the backbone's view;
- heatmaps and evaluated maps: a G x G map drawn on the stored image with cell (h, w) at its circle
  centre, piecewise-linear between centres and constant beyond the outer ones (:meth:`upsample`);
- regions (explain-anything and intervention): a pixel mask acts on the grid through the adjoint of
  that same upsampling (:meth:`region_weights`, :meth:`region_shares`).

Coordinates: continuous pixel coordinates (pixel i spans [i, i + 1)) for the affine maps; pixel
centres (pixel i at i, as in lib.kernels.rings) for :meth:`centres`. A feature map of h x w cells is
taken to tile the backbone's input evenly (cell j centred at (j + 1/2) / h of it), which holds for
CNNs whose input is a multiple of their stride and for ViT patch grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lib.kernels.preprocess import Preprocess
from lib.kernels.rings import grid_centers

__all__ = ["Registration", "sample_features"]


def sample_features(features: Tensor, grid: Tensor) -> Tensor:
    """Features (B, C, h, w) sampled bilinearly at `grid` (G, G, 2) -> (B, C, G, G) float32.

    `grid` holds (x, y) in [-1, 1] of the backbone's input (grid_sample, align_corners=False);
    points outside it take the nearest border cell's value.
    """
    if features.ndim != 4:
        raise ValueError(f"features must have shape (B, C, h, w), got {tuple(features.shape)}")
    x = features.to(torch.float32)
    where = grid.to(x.device, torch.float32).expand(x.shape[0], *grid.shape)
    return F.grid_sample(x, where, mode="bilinear", padding_mode="border", align_corners=False)


def _hats(size: int, ticks: Tensor) -> Tensor:
    """(size, G) piecewise-linear interpolation from G evenly spaced ticks to pixel centres 0..size-1,
    constant beyond the outer ticks: row p holds the weights of pixel p (they sum to 1)."""
    pixels = torch.arange(size, dtype=torch.float32, device=ticks.device)
    clamped = pixels.clamp(float(ticks[0]), float(ticks[-1]))
    if ticks.numel() == 1:
        return torch.ones(size, 1, device=ticks.device)
    spacing = float(ticks[1] - ticks[0])
    return (1 - (clamped[:, None] - ticks[None, :]).abs() / spacing).clamp_min(0)


@dataclass(frozen=True)
class Registration:
    """The grid of SALF-CBM on images of `image_size` seen by CLIP through `prompt` and by the
    backbone through `backbone`."""

    image_size: tuple[int, int]  # (H, W) of the stored images
    grid: int  # G
    prompt: Preprocess  # CLIP's preprocessing: the view the circles are drawn in
    backbone: Preprocess  # the backbone's preprocessing: the view its feature maps tile

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) < 2:
            raise ValueError(f"image_size must be (H, W) with H, W >= 2, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        grid_centers(self.prompt.size, self.grid)  # raises for a grid that does not fit CLIP's input

    def _prompt_edges(self) -> Tensor:
        """(G,) circle-centre coordinates along an axis of CLIP's input, continuous (pixel i spans [i, i + 1))."""
        return grid_centers(self.prompt.size, self.grid)[: self.grid, 1] + 0.5

    def centres(self) -> tuple[Tensor, Tensor]:
        """(ys (G,), xs (G,)) float32: the circle centres in pixels of the stored image (pixel i at i)."""
        edges = self._prompt_edges()
        (sy, oy), (sx, ox) = self.prompt.view(*self.image_size)
        return (edges + oy) / sy - 0.5, (edges + ox) / sx - 0.5

    def feature_grid(self, device: torch.device | str | None = None) -> Tensor:
        """(G, G, 2) grid_sample coordinates (x, y in [-1, 1], align_corners=False) of the circle
        centres in the backbone's input; cell (h, w) reads row h, column w."""
        edges = self._prompt_edges()
        (py, qy), (px, qx) = self.prompt.view(*self.image_size)
        (by, ry), (bx, rx) = self.backbone.view(*self.image_size)
        size = self.backbone.size
        ys = ((edges + qy) / py * by - ry) * 2 / size - 1
        xs = ((edges + qx) / px * bx - rx) * 2 / size - 1
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x, grid_y], dim=-1).to(device)

    def sample(self, features: Tensor) -> Tensor:
        """Backbone features (B, C, h, w) at the circle centres: (B, C, G, G) float32."""
        return sample_features(features, self.feature_grid(features.device))

    def _interpolation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        ys, xs = (t.to(device) for t in self.centres())
        return _hats(self.image_size[0], ys), _hats(self.image_size[1], xs)

    def upsample(self, maps: Tensor) -> Tensor:
        """(..., G, G) maps drawn on the stored image: (..., H, W) float32, cell (h, w) at its circle
        centre, piecewise-linear between centres and constant beyond the outer ones."""
        if maps.ndim < 2 or tuple(maps.shape[-2:]) != (self.grid, self.grid):
            raise ValueError(f"maps must end in the ({self.grid}, {self.grid}) grid, got {tuple(maps.shape)}")
        rows, cols = self._interpolation(maps.device)
        return torch.einsum("...gh,yg,xh->...yx", maps.to(torch.float32), rows, cols)

    def region_weights(self, mask: Tensor) -> Tensor:
        """(G, G) weight of each cell in a pixel mask (H, W): the adjoint of :meth:`upsample`, so
        sum(mask * upsample(c)) == sum(region_weights(mask) * c) for every map c."""
        if tuple(mask.shape) != self.image_size:
            raise ValueError(f"mask must have shape {self.image_size}, got {tuple(mask.shape)}")
        rows, cols = self._interpolation(mask.device)
        return rows.T @ mask.to(torch.float32) @ cols

    def region_shares(self, mask: Tensor) -> Tensor:
        """(G, G) in [0, 1]: the share of each cell's footprint (the pixels its value reaches when
        upsampled, weighted as it reaches them) that lies in the mask. 1 everywhere for the whole
        image; nonzero exactly where :meth:`region_weights` is."""
        return self.region_weights(mask) / self.region_weights(torch.ones_like(mask, dtype=torch.float32))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; inverse of :meth:`from_dict`."""
        return {
            "image_size": list(self.image_size),
            "grid": self.grid,
            "prompt": self.prompt.to_dict(),
            "backbone": self.backbone.to_dict(),
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Registration:
        return cls(
            image_size=tuple(record["image_size"]),
            grid=int(record["grid"]),
            prompt=Preprocess.from_dict(record["prompt"]),
            backbone=Preprocess.from_dict(record["backbone"]),
        )
