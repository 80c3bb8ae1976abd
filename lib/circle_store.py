"""The circles stage's work: red-circle and plain-image CLIP embeddings of every image, fp16.

The store (data/<name>/circles.zarr) holds "circles" (N, G, G, D), the embedding of image n
with a ring centred on grid cell (h, w), and "global" (N, D), the plain image's embedding; both
L2-normalised before the fp16 cast. It depends on the images and the CLIP settings only, never
on the concept list, so editing concepts never re-runs this, the expensive stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress

from lib.circles import CircleEncoder
from lib.distributed import Ranks, sharded_outputs
from lib.extract import fill_stores
from lib.layout import Layout
from lib.models.clip import load_clip
from lib.params import Params, params_hash
from lib.similarity import clip_provenance
from lib.stores import ArraySpec, ShardedWriter, open_store

__all__ = ["CIRCLES", "GLOBAL", "CirclesReport", "extract_circles"]

CIRCLES = "circles"
GLOBAL = "global"
# Settings that change how the work is split, not what is stored: a rerun with new values
# resumes the same store instead of recomputing every image.
_EXECUTION_KEYS = {"batch_size", "chunk"}


@dataclass(frozen=True)
class CirclesReport:
    n_images: int
    grid: int
    embed_dim: int
    model_id: str
    shards_written: int


def extract_circles(
    config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None
) -> CirclesReport:
    """Write ``circles.zarr`` for every image of the image store; resumes an interrupted run.

    The ring geometry is validated against the CLIP input size before any image is encoded.
    Under torchrun each rank encodes and writes the whole shards it owns.
    """
    image_store = open_store(layout.images)
    images = image_store["images"]
    settings = config.circles
    clip = load_clip(config.clip.model, config.clip.pretrained)
    encoder = CircleEncoder(
        clip.model.to(device), clip.preprocess, settings.grid, settings.radius, settings.width,
        settings.color, settings.chunk, settings.autocast,
    )
    n, rows = images.shape[0], (images.shards or images.chunks)[0]
    grid, dim = settings.grid, clip.embed_dim
    # The CLIP's model id carries its weights' hash, the image store's fingerprint its content.
    content = settings.model_dump(mode="json", exclude=_EXECUTION_KEYS)
    fingerprint = params_hash(content, clip.model_id, image_store.attrs["fingerprint"])
    attributes = {
        "stage": "circles",
        "params_hash": fingerprint,
        **clip_provenance(clip.model_id, dim),
        "input_size": clip.preprocess.size,
        **content,
    }
    specs = [
        ArraySpec(CIRCLES, (n, grid, grid, dim), "float16", ("item", "grid_y", "grid_x", "embed")),
        ArraySpec(GLOBAL, (n, dim), "float16", ("item", "embed")),
    ]

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {CIRCLES: ShardedWriter(layout.circles, specs, rows, attributes, fingerprint, create=create)}

    def encode(batch: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        circles, plain = encoder(batch)
        return {CIRCLES: {CIRCLES: circles, GLOBAL: plain}}

    with sharded_outputs(make_writers, ranks) as writers:
        written = fill_stores(
            writers, images, encode, batch_size=settings.batch_size, device=device, ranks=ranks,
            progress=progress, description="circles",
        )
    return CirclesReport(n, grid, dim, clip.model_id, written)
