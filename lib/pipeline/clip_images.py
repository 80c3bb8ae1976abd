"""The clip_images stage's work: plain-image CLIP embeddings of every image, fp16.

The store (data/<name>/clip_images.zarr) holds "image_emb" (N, D), L2-normalised before the fp16
cast, and "image_norm" (N,) float32, the L2 norm of the raw CLIP output (open_clip's
`encode_image`, Hugging Face's `get_image_features`): image_emb * image_norm is the raw embedding
to fp16 precision, the target CE-FAM's authors regress their translator on. The store depends on
the images and the CLIP only, so changing the ring settings of `circles` re-runs neither this nor
what reads it (the concept filter; CE-FAM's translator targets).

With `clip_images.dense` it also holds "dense" (N, D', h, w) fp16: the CLIP's last spatial feature
map (lib.models.clip.dense_layer; the toy CLIP's layer4, 2 x 2 at 64 px), unnormalised, which FaCT's
C²-Score encodes attributions with. It is captured in the same forward as the embedding, but its
store is large; turn it off where nothing reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import Progress

from lib.core.device import autocast_dtype, precision_name
from lib.core.distributed import Ranks, sharded_outputs
from lib.core.extract import Fill, fill_stores
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.schema import DENSE, IMAGE_EMB, IMAGE_NORM, clip_provenance, images_provenance
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.models.clip import check_clip, dense_layer, load_clip_checked
from lib.models.layers import extract_layers, forward_with_layers

__all__ = ["ClipImagesReport", "check_clip_images", "run_clip_images"]


@dataclass(frozen=True)
class ClipImagesReport:
    n_images: int
    embed_dim: int
    model_id: str
    fill: Fill
    precision: str

    @property
    def shards_written(self) -> int:
        return self.fill.shards

    def summary(self) -> str:
        return (f"{self.n_images} images, D={self.embed_dim}, {self.precision}, {self.shards_written} shards written "
                f"({self.fill.summary()}; {self.model_id})")


def check_clip_images(config: Params) -> None:
    """The stage's checks before any work: the `clip` section (no weights loaded)."""
    check_clip(config.clip)


def run_clip_images(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None) -> ClipImagesReport:
    """Write ``clip_images.zarr``: the CLIP embedding of every plain image; resumes an interrupted run."""
    image_store = open_store(layout.images)
    images = image_store["images"]
    settings = config.clip_images
    clip = load_clip_checked(config.clip)
    model, preprocess = clip.model.to(device), clip.preprocess
    dtype = autocast_dtype(device, settings.autocast)
    n, rows = images.shape[0], (images.shards or images.chunks)[0]
    dense = dense_layer(model) if settings.dense else None
    # "norms": stores written before image_norm existed have another fingerprint and are rewritten
    fingerprint = params_hash(clip.model_id, image_store.attrs["fingerprint"], {"dense": dense, "norms": True})
    attributes = {"stage": "clip_images", "params_hash": fingerprint, **clip_provenance(clip.model_id, clip.embed_dim),
                  "input_size": preprocess.size, "dense_layer": dense, **images_provenance(image_store.attrs)}
    specs = [
        ArraySpec(IMAGE_EMB, (n, clip.embed_dim), "float16", ("item", "embed")),
        ArraySpec(IMAGE_NORM, (n,), "float32", ("item",)),
    ]
    if dense is not None:
        with torch.inference_mode():
            probe = extract_layers(model.visual, preprocess(torch.from_numpy(images[:1]).to(device)), [dense])[dense]
        specs.append(ArraySpec(DENSE, (n, *probe.shape[1:]), "float16", ("item", "channel", "y", "x")))

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {IMAGE_EMB: ShardedWriter(layout.clip_images, specs, rows, attributes, fingerprint, create=create)}

    def encode(batch: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        x = preprocess(batch)
        with torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
            if dense is None:
                embedding, maps = model.encode_image(x), {}
            else:  # encode_image is model.visual (open_clip); one forward gives the embedding and the dense map
                embedding, maps = forward_with_layers(model.visual, x, [dense])
        embedding = embedding.float()
        arrays = {IMAGE_EMB: F.normalize(embedding, dim=-1), IMAGE_NORM: embedding.norm(dim=-1)}
        if dense is not None:
            arrays[DENSE] = maps[dense].float()
        return {IMAGE_EMB: arrays}

    with sharded_outputs(make_writers, ranks) as writers:
        fill = fill_stores(writers, images, encode, batch_size=settings.batch_size, device=device, ranks=ranks,
                           progress=progress, description="clip_images")
    return ClipImagesReport(n, clip.embed_dim, clip.model_id, fill, precision_name(dtype))
