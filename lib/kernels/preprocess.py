"""Batched, on-device image preprocessing (resize, centre crop, normalise) described by data.

The fields mirror open_clip's `PreprocessCfg` (size, mean, std, interpolation, resize_mode) plus
`resize_size` for torchvision/timm-style "resize to 256, crop 224" evaluation transforms, so one
record describes every backbone and CLIP model and can be stored beside a checkpoint.
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """How a model expects its images.

    size: side of the square model input. resize_mode (as open_clip): "shortest" resizes the
    short side to `resize_size` (default `size`) and centre-crops; "longest" resizes the long
    side to `size` and centre-pads with zeros; "squash" resizes straight to size x size.
    mean/std: per-channel normalisation of [0, 1] RGB.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)  # lists from JSON/YAML become hashable tuples
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.resize_size is not None:
            if self.resize_mode != "shortest":
                raise ValueError(f"resize_size is only used with resize_mode='shortest', got {self.resize_mode!r}")
            if not isinstance(self.resize_size, int) or self.resize_size < self.size:
                raise ValueError(f"resize_size must be an int >= size ({self.size}), got {self.resize_size!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for mean/std); inverse of `from_dict`."""
        record = asdict(self)
        record["mean"], record["std"] = list(self.mean), list(self.std)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Preprocess":
        """Rebuild from `to_dict` output; unknown keys raise ValueError."""
        unknown = set(record) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Preprocess keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**record)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) or (B, 3, H, W) -> normalised float32 (B, 3, size, size).

        Runs on `images.device`; the resize works on uint8 like PIL so results match the
        libraries' PIL pipelines to within rounding.
        """
        x = _channels_first(images)
        height, width = x.shape[-2:]
        resized = self.resized_shape(height, width)
        if resized != (height, width):
            x = TF.resize(x, list(resized), interpolation=TF.InterpolationMode(self.interpolation), antialias=True)
        # center_crop pads with zeros when the image is smaller: exactly "longest" mode's padding.
        x = TF.center_crop(x, [self.size, self.size])
        x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, mean=list(self.mean), std=list(self.std))

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of an (height, width) image after the resize step, before the centre crop or pad
        (torchvision's rounding: the scaled side is truncated to an int)."""
        if self.resize_mode == "squash":
            return self.size, self.size
        short, long = min(height, width), max(height, width)
        if self.resize_mode == "shortest":
            new_short = self.resize_size or self.size
            new_long = int(new_short * long / short)
        else:  # longest
            new_short, new_long = int(self.size * short / long), self.size
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def view(self, height: int, width: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """Where an (height, width) image lands in the model input, per axis (y, then x): (scale, offset)
        with input = scale * image - offset in continuous pixel coordinates (pixel i spans [i, i + 1)).

        The offset is the centre crop's start (torchvision's rounding), negative where the image
        is padded instead ("longest" mode)."""
        axes = []
        for length, resized in zip((height, width), self.resized_shape(height, width)):
            if resized >= self.size:
                offset = int(round((resized - self.size) / 2.0))
            else:
                offset = -((self.size - resized) // 2)
            axes.append((resized / length, float(offset)))
        return axes[0], axes[1]

    def normalise_color(self, rgb: tuple[int, int, int], device: torch.device | str | None = None) -> torch.Tensor:
        """An RGB colour (0-255) in normalised space, float32 (3,): (rgb / 255 - mean) / std.

        Normalisation is affine per channel, so blending this into a normalised image equals
        drawing the colour on the raw image first.
        """
        if len(rgb) != 3 or any(not isinstance(v, int) or not 0 <= v <= 255 for v in rgb):
            raise ValueError(f"rgb must be 3 ints in [0, 255], got {rgb!r}")
        value = torch.tensor(rgb, dtype=torch.float32, device=device) / 255
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device)
        std = torch.tensor(self.std, dtype=torch.float32, device=device)
        return (value - mean) / std


def _channels_first(images: torch.Tensor) -> torch.Tensor:
    """Validate a uint8 image batch and return it as (B, 3, H, W)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        raise ValueError(f"images must be a uint8 tensor (B, H, W, 3) or (B, 3, H, W), got {shape} {dtype}")
    if images.shape[1] == 3:
        return images
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"images must have 3 channels first or last, got shape {tuple(images.shape)}")
