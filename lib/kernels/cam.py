"""Reference heatmaps that give the explanation metrics context.

- `random_maps`: i.i.d. uniform noise, the chance level of NRA / EPG / Hit and segmentation.
- `centre_prior`: a centred Gaussian, the photographer's bias that object masks share.
- `cam_maps`: Grad-CAM, Grad-CAM++ and Score-CAM of the backbone for a class, through the
  `grad-cam` package (pytorch_grad_cam), the usual baselines of the zero-shot segmentation task.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace
from typing import Literal
from unittest import mock

import torch
import tqdm
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM, score_cam
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

CamMethod = Literal["gradcam", "gradcam++", "scorecam"]
CAM_METHODS: dict[str, type] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}


def random_maps(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform [0, 1) float32 maps of `shape`, e.g. (B, H, W).

    Drawn from a seeded CPU generator and then moved, so one seed gives the same maps on every
    device (CUDA generators produce other streams).
    """
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"shape must have non-negative sizes; got {tuple(shape)}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator).to(device)


def centre_prior(
    batch: int, height: int, width: int, device: torch.device | str = "cpu", sigma: float = 0.25
) -> Tensor:
    """A Gaussian centred on the image, 1 at the centre, float32 (batch, height, width).

    The standard deviation along each axis is `sigma` times that side, so the prior stretches
    with the aspect ratio. Pixel (i, j) sits at its centre (i + 0.5, j + 0.5).
    """
    if min(batch, height, width) < 1:
        raise ValueError(f"batch, height and width must be >= 1; got {batch}, {height}, {width}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (a fraction of the image side); got {sigma}")

    def axis(size: int) -> Tensor:
        offset = (torch.arange(size, device=device, dtype=torch.float32) + 0.5 - size / 2) / (sigma * size)
        return torch.exp(-0.5 * offset**2)

    prior = axis(height)[:, None] * axis(width)[None, :]  # separable: exp(-(a+b)) = exp(-a)·exp(-b)
    return prior.expand(batch, height, width).clone()


@contextmanager
def _quiet_score_cam() -> Iterator[None]:
    """Score-CAM draws a tqdm bar per image (600 lines for the toy test split) and has no switch
    for it; the stage shows its own progress. Only the package's module reference is swapped."""
    with mock.patch.object(score_cam, "tqdm", SimpleNamespace(tqdm=partial(tqdm.tqdm, disable=True))):
        yield


def cam_maps(
    model: nn.Module,
    target_layer: nn.Module,
    images: Tensor,
    targets: Tensor,
    method: CamMethod = "gradcam",
    batch_size: int = 32,
) -> Tensor:
    """Class activation maps of `model` at `target_layer` for the given classes.

    images: normalised (B, 3, H, W) input; targets: (B,) integer class ids. Returns float32
    (B, H, W) in [0, 1] on images.device: the package's ReLU'd CAM, upsampled to the input size
    and min-max scaled per image (an all-zero CAM stays 0).
    Images go through the package `batch_size` at a time; Score-CAM also scores its masked
    copies `batch_size` at a time (the package loops over images there; its progress bars are
    silenced).
    The package returns NumPy arrays, hence a round trip through host memory.
    Works with frozen parameters (requires_grad False). The model is put back in its original
    train/eval mode and its parameter gradients cleared.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {sorted(CAM_METHODS)}; got {method!r}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be (B, C, H, W) with B >= 1; got shape {tuple(images.shape)}")
    integer = not targets.is_floating_point() and targets.dtype != torch.bool
    if targets.shape != images.shape[:1] or not integer or (targets < 0).any():
        raise ValueError(
            f"targets must be non-negative integer class ids of shape ({images.shape[0]},); "
            f"got {targets.dtype} {tuple(targets.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")

    was_training = model.training
    cam = CAM_METHODS[method](model=model, target_layers=[target_layer])
    cam.batch_size = batch_size  # read by ScoreCAM for its masked forward passes
    chunks = []
    # not `with cam:` — the package's __exit__ swallows IndexError (e.g. a class id out of range)
    try:
        # gradients are needed even when the caller runs under no_grad
        with torch.enable_grad(), _quiet_score_cam():
            for start in range(0, images.shape[0], batch_size):
                classes = [ClassifierOutputTarget(c) for c in targets[start : start + batch_size].tolist()]
                # an input that requires grad makes the layer's activations differentiable even
                # when the model's parameters are frozen (as load_backbone returns them)
                chunk = images[start : start + batch_size].detach().requires_grad_(True)
                chunks.append(torch.from_numpy(cam(input_tensor=chunk, targets=classes)))
    finally:
        cam.activations_and_grads.release()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return torch.cat(chunks).to(images.device)
