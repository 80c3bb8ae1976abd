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
from lib.core.errors import UserError
from lib.core.extract import Fill, fill_stores
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.schema import CIRCLES, clip_provenance, images_provenance, view_provenance
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.kernels.rings import CircleEncoder, RingGeometryError, validate_grid
from lib.models.clip import check_clip, load_clip_checked

__all__ = ["CirclesReport", "check_circles", "run_circles"]

# Settings that change how the work is split, not what is stored: a rerun with new values
# resumes the same store instead of recomputing every image.
_EXECUTION_KEYS = {"batch_size", "chunk", "autocast"}


@dataclass(frozen=True)
class CirclesReport:
    n_images: int
    grid: int
    embed_dim: int
    model_id: str
    fill: Fill
    precision: str

    @property
    def shards_written(self) -> int:
        return self.fill.shards

    def summary(self) -> str:
        return (f"{self.n_images} images, grid {self.grid}x{self.grid}, D={self.embed_dim}, {self.precision}, "
                f"{self.shards_written} shards written ({self.fill.summary()}; {self.model_id})")


def check_circles(config: Params) -> None:
    """The stage's checks before any work: the `clip` section, and the ring geometry against the
    CLIP's input size (read from its config, no weights loaded)."""
    size = check_clip(config.clip)
    settings = config.circles
    try:
        validate_grid(size, settings.grid, settings.radius, settings.width)
    except RingGeometryError as error:
        raise UserError(
            str(error), key=f"circles.{error.parameter}", value=getattr(settings, error.parameter),
            fix=f"the CLIP input ({config.clip.model}) is {size} px: choose circles.grid, radius and width that fit it",
        ) from None


def run_circles(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None) -> CirclesReport:
    """Write ``circles.zarr`` for every image of the image store; resumes an interrupted run.

    The stage validates the ring geometry against the CLIP input size first (`check_circles`).
    Under torchrun each rank encodes and writes the whole shards it owns.
    """
    image_store = open_store(layout.images)
    images = image_store["images"]
    settings = config.circles
    clip = load_clip_checked(config.clip)
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
        **view_provenance(clip.preprocess.to_dict(), images.shape[1:3]),  # where the rings lie (lib/kernels/registration.py)
        **images_provenance(image_store.attrs),
        **content,
    }
    specs = [ArraySpec(CIRCLES, (n, grid, grid, dim), "float16", ("item", "grid_y", "grid_x", "embed"))]

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {CIRCLES: ShardedWriter(layout.circles, specs, rows, attributes, fingerprint, create=create)}

    def encode(batch: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        return {CIRCLES: {CIRCLES: encoder(batch)}}

    with sharded_outputs(make_writers, ranks) as writers:
        fill = fill_stores(
            writers, images, encode, batch_size=settings.batch_size, device=device, ranks=ranks,
            progress=progress, description="circles",
        )
    return CirclesReport(n, grid, dim, clip.model_id, fill, precision_name(encoder.dtype))
