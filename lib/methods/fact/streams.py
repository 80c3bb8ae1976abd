"""Streams of feature vectors for FaCT's SAE: the training batches from the sae_data store, and every
position's vector of a split from the features store.

`VectorStream` serves the training batches: per epoch a seeded order of the store's shards, read
`buffer_shards` at a time and shuffled within that window; the batch of step s is a pure function of
s (windows drop their last incomplete batch), so a resumed training run sees the very batches the
killed one would have. Memory: one window of shards, whatever the number of vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import zarr
from torch import Tensor

from lib.core.distributed import Ranks
from lib.core.params import Params
from lib.core.streams import read_rows

__all__ = ["IMAGE", "POSITION", "VECTORS", "VectorStream", "fact_layer", "feature_vectors"]

# arrays of the sae_data store (lib/methods/fact/vectors.py)
VECTORS, IMAGE, POSITION = "vectors", "image", "position"


def fact_layer(config: Params) -> str:
    """The layer FaCT's SAE lives at: fact.layer, or the last of features.layers."""
    return config.fact.layer or config.features.layers[-1]


class VectorStream:
    """Shuffled training batches (B, C) float32 from the sae_data store's vectors (module doc).

    Under torchrun each rank streams only the shards it owns (round-robin over `ranks`)."""

    def __init__(self, vectors: zarr.Array, batch_size: int, seed: int, buffer_shards: int, ranks: Ranks | None = None) -> None:
        ranks = ranks or Ranks()
        self.vectors = vectors
        self.batch_size, self.seed, self.buffer_shards = batch_size, seed, buffer_shards
        self.rows_per_shard = (vectors.shards or vectors.chunks)[0]
        self.shards = np.arange(max(1, math.ceil(vectors.shape[0] / self.rows_per_shard)))[ranks.rank :: ranks.world_size]
        held = sum(self._shard_rows(s) for s in self.shards)
        if self.rows_per_shard * min(buffer_shards, len(self.shards)) < batch_size or held < batch_size:
            raise ValueError(
                f"a batch of {batch_size} vectors does not fit in {min(buffer_shards, len(self.shards))} shards of "
                f"{self.rows_per_shard} vectors ({held} in all): lower the batch size or raise buffer_shards"
            )

    def _shard_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, self.vectors.shape[0] - shard * self.rows_per_shard)

    def _windows(self, epoch: int) -> list[np.ndarray]:
        order = self.shards[np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))]
        return [order[start : start + self.buffer_shards] for start in range(0, len(order), self.buffer_shards)]

    def _read(self, shards: np.ndarray) -> np.ndarray:
        return np.concatenate([self.vectors[s * self.rows_per_shard : s * self.rows_per_shard + self._shard_rows(s)] for s in shards])

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        """The batches of steps start, start + 1, ... (endless: epoch after epoch)."""
        step = 0
        for epoch in range(1 << 62):
            for number, shards in enumerate(self._windows(epoch)):
                count = sum(self._shard_rows(s) for s in shards) // self.batch_size
                if step + count <= start:  # a window before the start: skip it without reading
                    step += count
                    continue
                window = self._read(shards)
                order = np.random.default_rng([self.seed, epoch, number]).permutation(len(window))
                for b in range(max(0, start - step), count):
                    yield torch.from_numpy(window[order[b * self.batch_size : (b + 1) * self.batch_size]]).float()
                step += count


def feature_vectors(feats: zarr.Array, rows: np.ndarray, batch_images: int) -> Iterator[Tensor]:
    """Every position's feature vector (B * H * W, C) float32 of the images `rows`, `batch_images` images at a time."""
    for start in range(0, len(rows), batch_images):
        block = torch.from_numpy(read_rows(feats, rows[start : start + batch_images])).float()
        yield block.permute(0, 2, 3, 1).reshape(-1, block.shape[1])
