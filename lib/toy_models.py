"""Training and checking the toy world's models: two backbones (CNN, B-cos CNN) and a teacher CLIP.

The models train on their own seeded draws of the toy world (larger than the default dataset and
independent of ``data/<name>``, which may hold real data); ``toy_report`` then scores the shipped
weights, loaded through the same loaders real weights use, on the prepared test split.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.data.prepare import toy_split
from lib.models.backbones import load_backbone, save_backbone
from lib.models.clip import load_clip
from lib.models.toy_clip import TOY_CLIP_NAME, register_toy_clip_config, save_open_clip_checkpoint, train_toy_clip
from lib.models.toy_clip_eval import evaluate_toy_clip_model
from lib.models.toy_cnn import build_toy, toy_preprocess
from lib.models.train_classifier import evaluate_classifier, train_classifier
from lib.params import Params
from lib.toy import world as toy_world

MODELS_DIR = Path("models/toy")
BACKBONE_FILES = {"cnn": MODELS_DIR / "cnn.pt", "bcos": MODELS_DIR / "bcos.pt"}
CLIP_DIR = MODELS_DIR / "clip"


def _draw(n: int, seed: int, stream: int, image_size: int) -> toy_world.ToyWorld:
    """An independent draw of the toy world: ``stream`` separates train from val draws."""
    return toy_world.generate(n, int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]), image_size)


def _tensors(world: toy_world.ToyWorld) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(world.images), torch.from_numpy(world.labels)


def train_toy_backbones(config: Params, device: torch.device, log: Callable[[str, dict], None]) -> pd.DataFrame:
    """Train and save both toy backbones; returns the per-epoch history (arch, epoch, losses, acc)."""
    params, size = config.toy_backbone, config.data.image_size
    train = _tensors(_draw(params.n_train, params.seed, 0, size))
    val = _tensors(_draw(params.n_val, params.seed, 1, size))
    rows = []
    for arch, settings in (("cnn", params.cnn), ("bcos", params.bcos)):
        torch.manual_seed(params.seed)
        model, preprocess = build_toy(arch, len(toy_world.CLASSES)), toy_preprocess(arch, size)
        history = train_classifier(
            model, train, val, preprocess,
            epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, weight_decay=settings.weight_decay,
            seed=params.seed, device=device, augment=settings.augment, loss=settings.loss,
            progress=lambda record, arch=arch: log(arch, record),
        )  # fmt: skip
        save_backbone(BACKBONE_FILES[arch], model.cpu(), f"toy:{arch}", len(toy_world.CLASSES), preprocess)
        for epoch, (train_loss, val_loss, val_acc) in enumerate(zip(history["train_loss"], history["val_loss"], history["val_acc"], strict=True)):
            rows.append({"arch": arch, "epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc})
    return pd.DataFrame(rows)


def train_teacher_clip(config: Params, device: torch.device, log: Callable[[dict], None]) -> pd.DataFrame:
    """Train and save the toy CLIP as an open_clip folder; returns the per-step loss curve."""
    params = config.toy_clip
    train = toy_world.generate(params.n_train, params.data_seed, config.data.image_size)
    val = toy_world.generate(params.n_val, params.data_seed + 1, config.data.image_size)
    model, history = train_toy_clip(
        train, val,
        steps=params.steps, batch_size=params.batch_size, lr=params.lr, seed=params.seed, device=device,
        ring_radius=params.ring_radius, ring_width=params.ring_width, grid=params.grid,
        ring_fraction=params.ring_fraction, object_fraction=params.object_fraction, n_swaps=params.n_swaps,
        weight_decay=params.weight_decay, warmup=params.warmup, eval_every=params.eval_every, progress=log,
    )  # fmt: skip
    save_open_clip_checkpoint(model.cpu(), CLIP_DIR)
    return pd.DataFrame({"step": np.arange(1, len(history["loss"]) + 1), "loss": history["loss"]})


def evaluate_toy_models(config: Params, device: torch.device) -> dict:
    """Test-split scores of the shipped toy models, loaded as a user would load real weights."""
    test = toy_split(config.data, "test")
    images, labels = _tensors(test)
    metrics: dict = {}
    for arch, key in (("cnn", "backbone_acc"), ("bcos", "bcos_acc")):
        backbone = load_backbone(f"toy:{arch}", str(BACKBONE_FILES[arch]))
        loss = config.toy_backbone.cnn.loss if arch == "cnn" else config.toy_backbone.bcos.loss
        metrics[key], _ = evaluate_classifier(backbone.model.to(device), images, labels, backbone.preprocess, 256, device, loss)
    register_toy_clip_config()
    clip = load_clip(TOY_CLIP_NAME, f"local-dir:{CLIP_DIR}")
    clip.model.to(device)
    params = config.toy_clip
    metrics.update(
        evaluate_toy_clip_model(
            clip.model, clip.tokenizer, clip.preprocess, test,
            ring_radius=params.ring_radius, ring_width=params.ring_width, grid=params.grid,
        )
    )
    return metrics
