"""Supervised training and evaluation of an image classifier on uint8 image tensors (toy backbones).

Images stay uint8 on the device; each batch is preprocessed (and augmented) there, so an
epoch is one permutation plus batched tensor ops, with no DataLoader workers.
"""

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lib.kernels.preprocess import Preprocess

LOSSES = ("ce", "bce")
MAX_SHIFT = 4  # pixels of random translation when augmenting


def _check_split(name: str, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(split, (tuple, list)) and len(split) == 2):
        raise ValueError(f"{name} must be a pair (images uint8 (N, H, W, 3), labels int64 (N,)), got {type(split).__name__}")
    images, labels = (torch.as_tensor(a) for a in split)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"{name} images must be uint8 (N, H, W, 3) or (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype != torch.int64:
        raise ValueError(f"{name} labels must be int64 (N,) with N = {len(images)}, got {labels.dtype} {tuple(labels.shape)}")
    if len(images) == 0:
        raise ValueError(f"{name} split is empty")
    return images, labels


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss: "ce" softmax cross-entropy, "bce" one-vs-all binary cross-entropy (B-cos recipe)."""
    if loss == "ce":
        return F.cross_entropy(logits, labels)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype))
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving augmentation of a normalised batch (B, 3, H, W), per image, on x.device.

    Random horizontal flip (toy shapes are left-right symmetric; triangles keep their apex up)
    and an integer shift of up to MAX_SHIFT pixels with reflected borders, both in one
    grid_sample: integer shifts land on pixel centres, so nothing is blurred.
    """
    batch, _, height, width = x.shape
    draws = torch.rand(batch, 3, generator=generator, device=generator.device).to(x.device)
    flip = torch.where(draws[:, 0] < 0.5, -1.0, 1.0)
    shift = torch.round((draws[:, 1:] * 2 - 1) * MAX_SHIFT) * 2 / torch.tensor([width, height], device=x.device)
    theta = torch.zeros(batch, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = flip, 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)


@torch.inference_mode()
def evaluate_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int,
    device: torch.device | str,
    loss: str = "ce",
) -> tuple[float, float]:
    """(accuracy, mean loss) of `model` in eval mode over uint8 images and int64 labels."""
    images, labels = _check_split("evaluation", (images, labels))
    model.eval()
    correct, total_loss = 0, 0.0
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start : start + batch_size].to(device))
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        total_loss += classification_loss(logits, y, loss).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    return correct / len(images), total_loss / len(images)


def train_classifier(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    preprocess: Preprocess,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device | str,
    augment: bool,
    progress: Callable[[dict], None] | None = None,
    loss: str = "ce",
) -> dict:
    """Train `model` in place with AdamW and a one-cycle schedule; evaluate on `val` each epoch.

    train/val: (uint8 images (N, H, W, 3) or (N, 3, H, W), int64 labels (N,)).
    Shuffling and augmentation draw from a generator seeded with `seed`; seed torch before
    building the model for a fully reproducible run. `progress` gets each epoch's record.
    Returns {"train_loss", "val_loss", "val_acc": per-epoch lists, "seconds": float}.
    """
    train_images, train_labels = _check_split("train", train)
    val_images, val_labels = _check_split("val", val)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={lr!r}, weight_decay={weight_decay!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    device = torch.device(device)
    model.to(device, memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and GPU
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_images) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    history: dict = {"train_loss": [], "val_loss": [], "val_acc": []}
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        running = torch.zeros((), device=device)  # summed on device: no sync per step
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            x = preprocess(train_images[index].to(device))
            if augment:
                x = augment_batch(x, generator)
            x = x.contiguous(memory_format=torch.channels_last)
            y = train_labels[index].to(device)
            batch_loss = classification_loss(model(x), y, loss)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            schedule.step()
            running += batch_loss.detach() * len(index)
        val_acc, val_loss = evaluate_classifier(model, val_images, val_labels, preprocess, batch_size, device, loss)
        record = {"epoch": epoch + 1, "train_loss": running.item() / len(order), "val_loss": val_loss, "val_acc": val_acc}
        for key in ("train_loss", "val_loss", "val_acc"):
            history[key].append(record[key])
        if progress is not None:
            progress(record)
    history["seconds"] = time.perf_counter() - started
    model.eval()
    return history
