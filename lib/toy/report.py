"""The toy_report stage's work: the shipped toy models scored on the toy test split (data.seed,
data.toy) drawn at each model's own image size (toy_backbone.image_size, toy_clip.image_size).

They are loaded through the loaders real weights use, so this also checks the shipped files.
"""

from dataclasses import dataclass

import torch
from rich.progress import Progress

from lib.core.layout import Layout
from lib.core.outputs import write_json
from lib.core.params import Params
from lib.data.prepare import toy_split
from lib.models.backbones import load_backbone
from lib.models.clip import load_clip
from lib.toy.clip_eval import evaluate_toy_clip_model
from lib.toy.models import BACKBONE_FILES, CLIP_DIR
from lib.toy.models.clip import TOY_CLIP_NAME, register_toy_clip_config
from lib.toy.train_classifier import evaluate_classifier
from lib.toy.world import ToyWorld


def _test_split(config: Params, image_size: int) -> ToyWorld:
    """The toy test split (data.seed, data.toy) drawn at a toy model's own image size: the prepared
    toy test split itself when data.image_size is that size (the toy params)."""
    return toy_split(config.data.model_copy(update={"image_size": image_size}), "test")


def evaluate_toy_models(config: Params, device: torch.device) -> dict:
    """Test-split scores of the shipped toy models, loaded as a user would load real weights."""
    test = _test_split(config, config.toy_backbone.image_size)
    images, labels = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    metrics: dict = {}
    for arch, key in (("cnn", "backbone_acc"), ("bcos", "bcos_acc")):
        backbone = load_backbone(f"toy:{arch}", str(BACKBONE_FILES[arch]))
        loss = config.toy_backbone.cnn.loss if arch == "cnn" else config.toy_backbone.bcos.loss
        metrics[key], _ = evaluate_classifier(backbone.model.to(device), images, labels, backbone.preprocess, 256, device, loss)
    register_toy_clip_config()
    clip = load_clip(TOY_CLIP_NAME, f"local-dir:{CLIP_DIR}")
    clip.model.to(device)
    params = config.toy_clip
    if params.image_size != config.toy_backbone.image_size:
        test = _test_split(config, params.image_size)
    metrics.update(
        evaluate_toy_clip_model(
            clip.model, clip.tokenizer, clip.preprocess, test,
            ring_radius=params.ring_radius, ring_width=params.ring_width, grid=params.grid,
        )
    )
    return metrics


@dataclass(frozen=True)
class ToyReport:
    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        local = ", ".join(f"{k} {v:.2f}" for k, v in m["clip_local_acc"].items())
        return f"backbone {m['backbone_acc']:.3f}, bcos {m['bcos_acc']:.3f}, CLIP local {local}, global {m['clip_global_acc']:.2f}"


def run_toy_report(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> ToyReport:
    """The toy_report stage: score the shipped toy models and write metrics/toy_models.json."""
    metrics = evaluate_toy_models(config, device)
    write_json(layout.toy_metrics, metrics)
    return ToyReport(metrics)
