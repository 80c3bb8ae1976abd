"""The features stage's work: backbone feature maps of chosen layers and logits, as fp16 stores."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from lib.core.distributed import Ranks, sharded_outputs
from lib.core.extract import fill_stores
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.data.manifest import read_dataset_info
from lib.models.backbones import LoadedBackbone, load_backbone
from lib.models.layers import extract_layers, resolve_layer

LOGITS = "logits"


@dataclass(frozen=True)
class FeaturesReport:
    n_images: int
    shapes: dict[str, tuple[int, ...]]
    shards_written: int
    removed: list[str] = field(default_factory=list)  # stores of layers no longer configured

    def summary(self) -> str:
        shapes = ", ".join(f"{k} {v}" for k, v in self.shapes.items())
        removed = f"; removed the stores of layers no longer configured: {', '.join(self.removed)}" if self.removed else ""
        return f"{self.n_images} images, {self.shards_written} shards written; {shapes}{removed}"


def _encoder(backbone: LoadedBackbone, layers: tuple[str, ...]):
    def encode(images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        x = backbone.preprocess(images)
        outputs = extract_layers(backbone.model, x, layers)
        stores = {layer: {"features": outputs[layer]} for layer in layers}
        for layer in layers:  # ViT: the CLS token is kept beside the (C, h, w) patch grid
            if f"{layer}.cls" in outputs:
                stores[layer]["cls"] = outputs[f"{layer}.cls"]
        stores[LOGITS] = {LOGITS: backbone.model(x)}
        return stores

    return encode


def _remove_other_stores(directory: Path, keep: set[Path]) -> list[str]:
    """Delete the stores in `directory` other than `keep` (layers dropped from features.layers):
    `dvc repro` clears the folder itself, a stage run by hand does not."""
    stale = sorted(path for path in directory.glob("*.zarr") if path not in keep)
    for path in stale:
        shutil.rmtree(path)
    return [path.stem for path in stale]


def run_features(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress) -> FeaturesReport:
    """Write ``features/<layer>.zarr`` for every configured layer and ``features/logits.zarr``."""
    info = read_dataset_info(layout.dataset_info)
    torch.manual_seed(0)  # weights: null means a random init; seeded so features are reproducible
    backbone = load_backbone(config.backbone.arch, config.backbone.weights, num_classes=len(info["classes"]))
    for layer in config.features.layers:
        resolve_layer(backbone.model, layer)  # fails early, listing the valid names
    backbone.model.to(device).eval()
    image_store = open_store(layout.images)
    images = image_store["images"]
    encode = _encoder(backbone, config.features.layers)
    with torch.inference_mode():
        probe = encode(torch.from_numpy(images[:1]).to(device))
    n, rows = images.shape[0], (images.shards or images.chunks)[0]
    # the model id carries the weights' hash, the image store's fingerprint its content
    fingerprint = params_hash(config.backbone, config.features, backbone.model_id, image_store.attrs["fingerprint"])
    provenance = {"stage": "features", "params_hash": fingerprint, "model_id": backbone.model_id}
    dims = {"features": ("item", "channel", "y", "x"), "cls": ("item", "channel"), LOGITS: ("item", "class")}

    removed: list[str] = []

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        if create:  # rank 0, before any store is opened
            keep = {layout.logits, *(layout.features(key) for key in probe if key != LOGITS)}
            removed.extend(_remove_other_stores(layout.logits.parent, keep))
        writers = {}
        for key, arrays in probe.items():
            path = layout.logits if key == LOGITS else layout.features(key)
            # logits stay fp32: tiny, and accuracy/contribution checks compare them exactly
            specs = [
                ArraySpec(name, (n, *value.shape[1:]), "float32" if key == LOGITS else "float16", dims[name])
                for name, value in arrays.items()
            ]
            writers[key] = ShardedWriter(
                path, specs, rows, {**provenance, "layer": key}, fingerprint, create=create, scratch=layout.scratch(path)
            )
        return writers

    with sharded_outputs(make_writers, ranks) as writers:
        written = fill_stores(
            writers,
            images,
            encode,
            batch_size=config.features.batch_size,
            device=device,
            ranks=ranks,
            progress=progress,
            description="features",
        )
    shapes = {key: tuple(value.shape[1:]) for key, arrays in probe.items() for value in arrays.values()}
    return FeaturesReport(n, shapes, written, removed)
