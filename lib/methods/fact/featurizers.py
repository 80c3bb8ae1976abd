"""The C²-Score's featurizers (fact.c2.featurizer): dense features F (B, D, h, w) of store rows, which
lib/methods/fact/c2.py upsamples bilinearly to the input maps' size. Each featurizer makes another
metric, so each has a name (metrics/fact.json c2_featurizer).

- gt: the ground-truth concept masks (images.zarr "masks", one 0/1 channel per concept, the images'
  size): e is the share of the map's mass on each concept, so C² measures whether a latent's images
  point at the same ground-truth concepts. The toy world's default: cheap, and the answer is known.
- backbone: the stored features of fact.c2.layer (features/<layer>.zarr; toy layer2: 16 x 16 x 64).
- clip: clip_images.zarr "dense" (the CLIP's last token grid: 2 x 2 on the 64-pixel toy images).
- timm: a timm ViT (default DINOv2-S, the authors' featurizer) from a local weights file, on the
  images resized to fact.c2.image_size; its patch tokens as the grid. The authors upsample DINOv2-S
  with a learned upsampler (LoftUp); here the upsampling is bilinear.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import Tensor, nn

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.schema import DENSE, FEATURES
from lib.core.stores import open_store

__all__ = ["Featurizer", "check_featurizer", "load_featurizer", "read_any", "timm_featurizer"]


def read_any(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows in any order (repeats allowed), reading each distinct row once."""
    unique, inverse = np.unique(rows, return_inverse=True)
    return array.get_orthogonal_selection((unique,))[inverse]


class Featurizer:
    """F(rows) -> (B, D, h, w) float32 on `device`; `name` says which (the metric's name)."""

    def __init__(self, name: str, array: zarr.Array | None = None, model: nn.Module | None = None,
                 images: zarr.Array | None = None, image_size: int = 224, device: torch.device | str = "cpu") -> None:
        self.name, self.array, self.model, self.images, self.image_size, self.device = name, array, model, images, image_size, device

    def __call__(self, rows: Tensor) -> Tensor:
        index = rows.cpu().numpy()
        if self.model is None:
            return torch.from_numpy(read_any(self.array, index)).to(self.device, torch.float32)
        return self._vit(torch.from_numpy(read_any(self.images, index)).to(self.device))

    @torch.no_grad()
    def _vit(self, images: Tensor) -> Tensor:
        cfg = self.model.pretrained_cfg
        x = images.permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=x.device)[:, None, None]
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=x.device)[:, None, None]
        tokens = self.model.forward_features((x - mean) / std)[:, self.model.num_prefix_tokens :]
        h, w = self.model.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(len(x), -1, h, w).float()


def _layer(config: Params) -> str:
    return config.fact.c2.layer or config.features.layers[0]


def check_featurizer(config: Params) -> None:
    """fact.c2's featurizer settings, before any work (the stores are checked when opened)."""
    settings = config.fact.c2
    if settings.featurizer == "backbone" and _layer(config) not in config.features.layers:
        raise UserError(f"fact.c2.layer {_layer(config)!r} is not extracted", key="fact.c2.layer",
                        fix=f"one of features.layers {list(config.features.layers)}")
    if settings.featurizer == "timm":
        if settings.weights is None:
            raise UserError("featurizer timm needs a local weights file (nothing is downloaded)", key="fact.c2.weights",
                            fix="set fact.c2.weights to the model's .safetensors/.pth, or another fact.c2.featurizer")
        if not Path(settings.weights).is_file():
            raise UserError(f"no such file: {settings.weights}", key="fact.c2.weights", fix="a local weights file of fact.c2.timm_model")


def load_featurizer(config: Params, layout: Layout, device: torch.device | str) -> Featurizer:
    """The configured featurizer; UserError when its data are missing."""
    check_featurizer(config)
    settings = config.fact.c2
    if settings.featurizer == "gt":
        images = open_store(layout.images)
        if "masks" not in images:
            raise UserError("featurizer gt needs ground-truth concept masks, and these images have none",
                            key="fact.c2.featurizer", fix="backbone, clip or timm")
        return Featurizer("gt", images["masks"], device=device)
    if settings.featurizer == "backbone":
        return Featurizer(f"backbone:{_layer(config)}", open_store(layout.features(_layer(config)))[FEATURES], device=device)
    if settings.featurizer == "clip":
        store = open_store(layout.clip_images)
        if DENSE not in store:
            raise UserError("featurizer clip needs the CLIP's dense features", key="fact.c2.featurizer",
                            fix="set clip_images.dense: true, or another featurizer")
        return Featurizer("clip", store[DENSE], device=device)
    return timm_featurizer(settings.timm_model, settings.weights, settings.image_size, open_store(layout.images)["images"], device)


def timm_featurizer(
    model_name: str, weights: str | Path, image_size: int, images: zarr.Array, device: torch.device | str = "cpu", **kwargs: Any
) -> Featurizer:
    """A timm model from a local weights file (its position embedding resampled to image_size by
    timm) over the uint8 images (N, H, W, 3); kwargs go to timm.create_model (e.g. a smaller model)."""
    import timm  # only this featurizer needs it

    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)},
                              num_classes=0, img_size=image_size, **kwargs)
    return Featurizer(f"timm:{model_name}", model=model.to(device).eval(), images=images, image_size=image_size, device=device)
