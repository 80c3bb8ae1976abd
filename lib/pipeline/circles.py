"""The circles stage's work: red-circle CLIP embeddings of every image, fp16.

The store (data/<name>/circles.zarr) holds "circles" (N, G, G, D), the embedding of image n with a
ring centred on grid cell (h, w), L2-normalised before the fp16 cast. It depends on the images and
the CLIP and ring settings only, never on the concept list, so editing concepts never re-runs this,
the expensive stage. The plain images' embeddings live in their own stage (`clip_images`), so
changing the rings re-runs nothing that reads only those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import Progress

from lib.core.device import autocast_dtype, precision_name
from lib.core.distributed import Ranks, sharded_outputs
from lib.core.errors import user_error_for
from lib.core.extract import fill_stores
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.schema import CIRCLES, clip_provenance
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.kernels.rings import blend_rings, grid_centers, ring_alpha, validate_grid
from lib.models.clip import load_clip_checked
from lib.models.preprocess import Preprocess

__all__ = ["CircleEncoder", "CirclesReport", "run_circles"]

# Settings that change how the work is split, not what is stored: a rerun with new values
# resumes the same store instead of recomputing every image.
_EXECUTION_KEYS = {"batch_size", "chunk", "autocast"}


class CircleEncoder:
    """CLIP embeddings of every red-circle variant of a batch of images.

    The ring masks are made once on the model's device; each call normalises the batch once,
    blends all grid*grid variants into the normalised tensor and encodes them in forwards of at
    most `chunk` images (whole source images of grid*grid variants each, at least one).
    `autocast` follows `lib.core.device.autocast_dtype` ("auto": low precision only where the
    hardware runs it natively).
    """

    def __init__(
        self,
        clip_model: torch.nn.Module,
        preprocess: Preprocess,
        grid: int = 7,
        radius: float = 32.0,
        width: float = 2.0,
        color: Sequence[int] = (255, 0, 0),
        chunk: int = 512,
        autocast: bool | str = "auto",
    ) -> None:
        validate_grid(preprocess.size, grid, radius, width)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 images per forward, got {chunk}")
        self.clip_model = clip_model
        self.preprocess = preprocess
        self.grid = grid
        self.device = next(clip_model.parameters()).device
        self.alpha = ring_alpha(preprocess.size, grid_centers(preprocess.size, grid, self.device), radius, width)
        self.color_norm = preprocess.normalise_color(tuple(color), self.device)
        self.images_per_forward = max(1, chunk // self.alpha.shape[0])
        self.dtype = autocast_dtype(self.device, autocast)

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 (B, G, G, D) embeddings of uint8 (B, H, W, 3) images, a ring at cell (h, w)."""
        x = self.preprocess(images_uint8.to(self.device, non_blocking=True))
        embeddings = []
        for start in range(0, x.shape[0], self.images_per_forward):
            blended = blend_rings(x[start : start + self.images_per_forward], self.alpha, self.color_norm, per_image=False)
            with torch.autocast(self.device.type, self.dtype or torch.bfloat16, enabled=self.dtype is not None):
                embeddings.append(self.clip_model.encode_image(blended).float())
        emb = F.normalize(torch.cat(embeddings), dim=-1)
        return emb.view(x.shape[0], self.grid, self.grid, -1)


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
