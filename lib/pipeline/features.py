"""The features stage's work: backbone feature maps of chosen layers and logits, as fp16 stores."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from lib.core.device import autocast_dtype
from lib.core.distributed import Ranks, sharded_outputs
from lib.core.extract import Fill, fill_stores
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.schema import images_provenance, view_provenance
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.data.manifest import read_dataset_info
from lib.models.backbones import LoadedBackbone, check_backbone, load_backbone_checked
from lib.models.classes import CLASS_MAP_ATTR, ClassMap, resolve_class_map
from lib.models.layers import check_layers, forward_with_layers

LOGITS = "logits"


@dataclass(frozen=True)
class FeaturesReport:
    n_images: int
    shapes: dict[str, tuple[int, ...]]
    fill: Fill
    class_map: ClassMap | None  # None: backbone.new_head
    removed: list[str] = field(default_factory=list)  # stores of layers no longer configured

    @property
    def shards_written(self) -> int:
        return self.fill.shards

    def summary(self) -> str:
        shapes = ", ".join(f"{k} {v}" for k, v in self.shapes.items())
        removed = f"; removed the stores of layers no longer configured: {', '.join(self.removed)}" if self.removed else ""
        if self.class_map is None:
            classes = (
                "; backbone.new_head: the dataset's classes get a new head (SALF-CBM's final layer), a different model from "
                "the backbone's own classifier: no acc_backbone, backbone predictions or CAMs"
            )
        else:
            m = self.class_map
            classes = f"; {len(m.outputs)} classes mapped {m.how} onto {m.n_outputs} backbone outputs"
        return f"{self.n_images} images, {self.shards_written} shards written ({self.fill.summary()}); {shapes}{classes}{removed}"


def _encoder(backbone: LoadedBackbone, layers: tuple[str, ...], dtype: torch.dtype | None):
    def encode(images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        x = backbone.preprocess(images)
        with torch.autocast(x.device.type, dtype or torch.bfloat16, enabled=dtype is not None):
            logits, outputs = forward_with_layers(backbone.model, x, layers)  # one forward
        stores = {layer: {"features": outputs[layer]} for layer in layers}
        for layer in layers:  # ViT: the CLS token is kept beside the (C, h, w) patch grid
            if f"{layer}.cls" in outputs:
                stores[layer]["cls"] = outputs[f"{layer}.cls"]
        stores[LOGITS] = {LOGITS: logits}
        return stores

    return encode


def _remove_other_stores(directory: Path, keep: set[Path]) -> list[str]:
    """Delete the stores in `directory` other than `keep` (layers dropped from features.layers):
    `dvc repro` clears the folder itself, a stage run by hand does not."""
    stale = sorted(path for path in directory.glob("*.zarr") if path not in keep)
    for path in stale:
        shutil.rmtree(path)
    return [path.stem for path in stale]


def check_features(config: Params) -> None:
    """The stage's checks before any work: the backbone's arch and weights exist, and its layers
    (the architecture is built on the meta device: no weights read, no memory)."""
    check_layers(check_backbone(config.backbone), config.features.layers, "features.layers")


def run_features(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress) -> FeaturesReport:
    """Write ``features/<layer>.zarr`` for every configured layer and ``features/logits.zarr``."""
    info = read_dataset_info(layout.dataset_info)
    torch.manual_seed(0)  # weights: null means a random init; seeded so features are reproducible
    backbone = load_backbone_checked(config.backbone)  # its own head: classes map onto its outputs
    class_map = resolve_class_map(
        info["classes"], info["kind"], backbone.output_names, backbone.num_classes,
        class_map=config.backbone.class_map, new_head=config.backbone.new_head, arch=config.backbone.arch,
    )
    backbone.model.to(device).eval()
    image_store = open_store(layout.images)
    images = image_store["images"]
    encode = _encoder(backbone, config.features.layers, autocast_dtype(device, config.features.autocast))
    with torch.inference_mode():
        probe = encode(torch.from_numpy(images[:1]).to(device))
    n, rows = images.shape[0], (images.shards or images.chunks)[0]
    # the model id carries the weights' hash, the image store's fingerprint its content
    fingerprint = params_hash(config.backbone, config.features, backbone.model_id, image_store.attrs["fingerprint"])
    provenance = {
        "stage": "features", "params_hash": fingerprint, "model_id": backbone.model_id,
        **view_provenance(backbone.preprocess.to_dict(), images.shape[1:3]),  # what the feature maps tile
        **images_provenance(image_store.attrs),
    }
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
            attributes, stamp = {**provenance, "layer": key}, fingerprint
            if key == LOGITS:  # it records how the dataset's classes map onto its outputs (lib/models/classes.py)
                mapping = None if class_map is None else class_map.to_attrs()
                attributes, stamp = {**attributes, CLASS_MAP_ATTR: mapping}, params_hash(fingerprint, {"class_map": mapping})
            writers[key] = ShardedWriter(path, specs, rows, attributes, stamp, create=create, scratch=layout.scratch(path))
        return writers

    with sharded_outputs(make_writers, ranks) as writers:
        fill = fill_stores(
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
    return FeaturesReport(n, shapes, fill, class_map, removed)
