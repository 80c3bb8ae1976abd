"""The clip_images stage's work: plain-image CLIP embeddings of every image, fp16.

The store (data/<name>/clip_images.zarr) holds "image_emb" (N, D), L2-normalised before the fp16
cast. It depends on the images and the CLIP only, so changing the ring settings of `circles`
re-runs neither this nor what reads it (the concept filter; CE-FAM's translator targets).

Seam for dense features: a later `dense` array (N, D', h, w) of the CLIP's last spatial feature
map (FaCT's C²-Score encodes attributions with it) is one more entry of `encode`'s output and one
more ArraySpec, written in the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import Progress

from lib.core.device import autocast_dtype, precision_name
from lib.core.distributed import Ranks, sharded_outputs
from lib.core.extract import fill_stores
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.schema import IMAGE_EMB, clip_provenance
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.models.clip import load_clip_checked

__all__ = ["ClipImagesReport", "run_clip_images"]


@dataclass(frozen=True)
class ClipImagesReport:
    n_images: int
    embed_dim: int
    model_id: str
    shards_written: int
    precision: str

    def summary(self) -> str:
        return f"{self.n_images} images, D={self.embed_dim}, {self.precision}, {self.shards_written} shards written ({self.model_id})"


def run_clip_images(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None) -> ClipImagesReport:
    """Write ``clip_images.zarr``: the CLIP embedding of every plain image; resumes an interrupted run."""
    image_store = open_store(layout.images)
    images = image_store["images"]
    settings = config.clip_images
    clip = load_clip_checked(config.clip)
    model, preprocess = clip.model.to(device), clip.preprocess
    dtype = autocast_dtype(device, settings.autocast)
    n, rows = images.shape[0], (images.shards or images.chunks)[0]
    fingerprint = params_hash(clip.model_id, image_store.attrs["fingerprint"])
    attributes = {"stage": "clip_images", "params_hash": fingerprint, **clip_provenance(clip.model_id, clip.embed_dim),
                  "input_size": preprocess.size}
    specs = [ArraySpec(IMAGE_EMB, (n, clip.embed_dim), "float16", ("item", "embed"))]

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {IMAGE_EMB: ShardedWriter(layout.clip_images, specs, rows, attributes, fingerprint, create=create)}

    def encode(batch: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        with torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
            emb = model.encode_image(preprocess(batch)).float()
        return {IMAGE_EMB: {IMAGE_EMB: F.normalize(emb, dim=-1)}}

    with sharded_outputs(make_writers, ranks) as writers:
        written = fill_stores(writers, images, encode, batch_size=settings.batch_size, device=device, ranks=ranks,
                              progress=progress, description="clip_images")
    return ClipImagesReport(n, clip.embed_dim, clip.model_id, written, precision_name(dtype))
