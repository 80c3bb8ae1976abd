"""The toy_backbone stage's work: train the toy world's two backbones (CNN, B-cos CNN).

The models train on their own seeded draws of the toy world (larger than the default dataset and
independent of ``data/<name>``, which may hold real data); ``lib.toy.report`` then scores the
shipped weights, loaded through the same loaders real weights use, on the prepared test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from lib.core.layout import Layout
from lib.core.outputs import write_csv
from lib.core.params import Params
from lib.models.weights import save_backbone
from lib.toy import world as toy_world
from lib.toy.models import BACKBONE_FILES
from lib.toy.models.cnn import build_toy, toy_preprocess
from lib.toy.train_classifier import train_classifier


def _draw(n: int, seed: int, stream: int, image_size: int) -> toy_world.ToyWorld:
    """An independent draw of the toy world: ``stream`` separates train from val draws."""
    return toy_world.generate(n, int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]), image_size)


def _tensors(world: toy_world.ToyWorld) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(world.images), torch.from_numpy(world.labels)


def train_toy_backbones(config: Params, device: torch.device, log: Callable[[str, dict], None]) -> pd.DataFrame:
    """Train and save both toy backbones; returns the per-epoch history (arch, epoch, losses, acc)."""
    params = config.toy_backbone
    size = params.image_size
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
        for epoch, (train_loss, val_loss, val_acc) in enumerate(
            zip(history["train_loss"], history["val_loss"], history["val_acc"], strict=True)
        ):
            rows.append({"arch": arch, "epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class ToyBackboneReport:
    history: pd.DataFrame

    def summary(self) -> str:
        last = self.history.groupby("arch").last()["val_acc"]
        return "val accuracy " + ", ".join(f"{arch} {acc:.3f}" for arch, acc in last.items())


def run_toy_backbone(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> ToyBackboneReport:
    """The toy_backbone stage: train both toy backbones, write their learning curves."""
    show = progress.console.print if progress is not None else print

    def log(arch: str, record: dict) -> None:
        show(f"{arch} epoch {record['epoch']}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
             f"val acc {record['val_acc']:.3f}")  # fmt: skip

    history = train_toy_backbones(config, device, log)
    write_csv(layout.toy_plot("toy_backbone"), history)
    return ToyBackboneReport(history)
