"""The circles stage's work: red-circle CLIP embeddings of every image, fp16.

The store (data/<name>/circles.zarr) holds "circles" (N, G, G, D), the embedding of image n with a
ring centred on grid cell (h, w), L2-normalised before the fp16 cast. It depends on the images and
the CLIP and ring settings only, never on the concept list, so editing concepts never re-runs this,
the expensive stage. The plain images' embeddings live in their own stage (`clip_images`), so
changing the rings re-runs nothing that reads only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress

from lib.core.device import precision_name
from lib.core.distributed import Ranks, sharded_outputs
from lib.core.errors import user_error_for
from lib.core.extract import fill_stores
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.schema import CIRCLES, clip_provenance
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.kernels.rings import CircleEncoder
from lib.models.clip import load_clip_checked

__all__ = ["CirclesReport", "run_circles"]

# Settings that change how the work is split, not what is stored: a rerun with new values
# resumes the same store instead of recomputing every image.
_EXECUTION_KEYS = {"batch_size", "chunk", "autocast"}


@dataclass(frozen=True)
class CirclesReport:
    n_images: int
    grid: int
    embed_dim: int
    model_id: str
    shards_written: int
    precision: str

    def summary(self) -> str:
        return (f"{self.n_images} images, grid {self.grid}x{self.grid}, D={self.embed_dim}, {self.precision}, "
                f"{self.shards_written} shards written ({self.model_id})")


def run_circles(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None) -> CirclesReport:
    """Write ``circles.zarr`` for every image of the image store; resumes an interrupted run.

    The ring geometry is validated against the CLIP input size before any image is encoded.
    Under torchrun each rank encodes and writes the whole shards it owns.
    """
    image_store = open_store(layout.images)
    images = image_store["images"]
    settings = config.circles
    clip = load_clip_checked(config.clip)
    with user_error_for("circles", settings.model_dump(mode="json", include={"grid", "radius", "width"}),
                        fix=f"the CLIP input is {clip.preprocess.size} px: choose a grid, radius and width that fit it"):
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
    specs = [ArraySpec(CIRCLES, (n, grid, grid, dim), "float16", ("item", "grid_y", "grid_x", "embed"))]

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {CIRCLES: ShardedWriter(layout.circles, specs, rows, attributes, fingerprint, create=create)}

    def encode(batch: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        return {CIRCLES: {CIRCLES: encoder(batch)}}

    with sharded_outputs(make_writers, ranks) as writers:
        written = fill_stores(
            writers, images, encode, batch_size=settings.batch_size, device=device, ranks=ranks,
            progress=progress, description="circles",
        )
    return CirclesReport(n, grid, dim, clip.model_id, written, precision_name(encoder.dtype))
