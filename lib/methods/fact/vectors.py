"""The sae_data stage's work, and the streams the SAE trains and is scored on.

sae_data: per train image, n = min(fact.positions_budget // C, H*W) positions of fact.layer's stored
feature map, drawn without replacement with probability |sum_c grad * act| of the predicted logit
(lib/methods/fact/sampling.py; gradients in B-cos explanation mode, as FaCT samples). The vectors
go to data/<name>/fact/sae_data.zarr, fp16, with the image (its row in images.zarr) and the flat
position h * W + w of each: a sharded store of `data.rows_per_shard` images' vectors per shard, so
neither this stage nor the SAE's training ever holds the whole set. Each shard draws from its own
generator (seeded by fact.seed and the shard), so a resumed run writes the same bytes, and so does
a run under `torchrun --nproc-per-node K`, where each rank computes and writes the shards it owns.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from lib.core.distributed import Ranks, sharded_outputs
from lib.core.layout import Layout
from lib.core.params import Params, params_hash, source_hash
from lib.core.schema import FEATURES
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.core.streams import read_rows
from lib.data.manifest import read_manifest, train_val_indices
from lib.methods.fact import sampling
from lib.methods.fact.backbone import FactBackbone, load_fact_backbone
from lib.methods.fact.contributions import detached_dynamic_weights
from lib.methods.fact.sampling import position_scores, positions_per_image, sample_positions
from lib.methods.fact.streams import IMAGE, POSITION, VECTORS, fact_layer

__all__ = ["SaeDataReport", "position_importance", "run_sae_data"]


def position_importance(backbone: FactBackbone, acts: Tensor) -> Tensor:
    """|sum_c grad * act| (B, H, W) of the logit of each image's predicted class, for feature maps
    acts (B, C, H, W) of the backbone's layer; gradients with dynamic weights detached (B-cos)."""
    acts = acts.detach().requires_grad_(True)
    with torch.enable_grad(), detached_dynamic_weights(backbone.tail):
        logits = backbone.tail(acts.clone())  # a clone: the tail may work in place on its input
        _, target = backbone.explained_output(logits.detach())
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts)
    return position_scores(acts.detach(), grad)


def _shard_seed(seed: int, shard: int) -> int:
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


@dataclass(frozen=True)
class SaeDataReport:
    n_images: int
    per_image: int
    positions: int  # H * W
    channels: int
    shards_written: int
    path: Path

    def summary(self) -> str:
        return (
            f"{self.n_images} train images x {self.per_image} of {self.positions} positions = {self.n_images * self.per_image} "
            f"vectors of {self.channels} channels, {self.shards_written} shards written -> {self.path}"
        )


def run_sae_data(config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None = None) -> SaeDataReport:
    """Write data/<name>/fact/sae_data.zarr: the SAE's training vectors (module doc); resumes an interrupted run."""
    settings = config.fact
    layer = fact_layer(config)
    backbone = load_fact_backbone(config, layout, device)
    store = open_store(layout.features(layer))
    feats = store[FEATURES]
    _, channels, height, width = feats.shape
    rows, _, _ = train_val_indices(read_manifest(layout.manifest), settings.val_fraction, settings.seed)
    per_image = positions_per_image(channels, height, width, settings.positions_budget)
    images_per_shard = config.data.rows_per_shard
    blocks = [rows[start : start + images_per_shard] for start in range(0, len(rows), images_per_shard)]
    n = len(rows) * per_image
    specs = [
        ArraySpec(VECTORS, (n, channels), "float16", ("vector", "channel")),
        ArraySpec(IMAGE, (n,), "int64", ("vector",)),
        ArraySpec(POSITION, (n,), "int32", ("vector",)),
    ]
    fingerprint = params_hash(
        {"layer": layer, "budget": settings.positions_budget, "seed": settings.seed},
        store.attrs["fingerprint"],
        hashlib.sha256(rows.tobytes()).hexdigest(),
        source_hash(sys.modules[__name__]),
        source_hash(sampling),
    )
    attributes = {"stage": "sae_data", "layer": layer, "model_id": backbone.model_id, "per_image": per_image, "grid": [height, width]}
    path = layout.fact_vectors

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {VECTORS: ShardedWriter(path, specs, images_per_shard * per_image, attributes, fingerprint, create=create,
                                       scratch=layout.scratch(path))}

    with sharded_outputs(make_writers, ranks) as writers:
        writer = writers[VECTORS]
        pending = writer.pending(ranks.rank, ranks.world_size)
        task = progress.add_task("sae_data", total=sum(len(blocks[s]) for s in pending)) if progress is not None else None
        for shard in pending:
            block = blocks[shard]
            generator = torch.Generator(device).manual_seed(_shard_seed(settings.seed, shard))
            parts: list[tuple[Tensor, Tensor, Tensor]] = []
            for start in range(0, len(block), settings.batch_size):
                chunk = block[start : start + settings.batch_size]
                acts = torch.from_numpy(read_rows(feats, chunk)).to(device, torch.float32)
                drawn = sample_positions(acts, position_importance(backbone, acts), settings.positions_budget, generator)
                image = torch.from_numpy(chunk).to(device)[drawn.image]
                parts.append((drawn.vectors, image, drawn.position))
                if task is not None:
                    progress.advance(task, len(chunk))
            vectors, image, position = (torch.cat(column).cpu().numpy() for column in zip(*parts, strict=True))
            writer.write(shard, {VECTORS: vectors, IMAGE: image, POSITION: position})
    return SaeDataReport(len(rows), per_image, height * width, channels, len(pending), path)
