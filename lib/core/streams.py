"""Streaming rows of Zarr stores into torch batches with bounded memory.

Stages select images by store row indices (from the manifest); reads are grouped by shard so each
shard is decoded once per pass. Training passes shuffle shard order and rows inside a small
buffer of shards — the usual trade-off that keeps memory at `buffer_shards` shards whatever N is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import zarr

BatchSource = Callable[[], Iterator[dict[str, torch.Tensor]]]


def read_rows(array: zarr.Array, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` (sorted) of ``array``: a slice read when contiguous, else a selection."""
    if len(indices) and indices[-1] - indices[0] + 1 == len(indices):
        return array[int(indices[0]) : int(indices[-1]) + 1]
    return array.get_orthogonal_selection((indices,))


def shard_groups(indices: np.ndarray, rows_per_shard: int) -> list[np.ndarray]:
    """Split sorted row indices into the groups that fall in one shard each."""
    indices = np.sort(np.asarray(indices))
    shard = indices // rows_per_shard
    cuts = np.flatnonzero(np.diff(shard)) + 1
    return [g for g in np.split(indices, cuts) if len(g)]


def batch_source(
    arrays: Mapping[str, zarr.Array],
    indices: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    buffer_shards: int = 4,
    device: torch.device | str = "cpu",
) -> BatchSource:
    """A re-iterable source of batches ``{"index": (B,), name: (B, ...)}`` over the given rows.

    All arrays must share the item axis and shard size. Without ``shuffle`` batches come in row
    order (for inference and statistics); with it every call draws a new permutation from
    ``seed`` and the pass number, so runs are reproducible.
    """
    first = next(iter(arrays.values()))
    rows_per_shard = (first.shards or first.chunks)[0]
    groups = shard_groups(indices, rows_per_shard)
    passes = iter(range(1 << 62))

    def iterate() -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([seed, next(passes)]) if shuffle else None
        order = rng.permutation(len(groups)) if rng is not None else np.arange(len(groups))
        step = buffer_shards if rng is not None else 1
        carry: dict[str, np.ndarray] | None = None
        for start in range(0, len(order), step):
            members = [groups[i] for i in order[start : start + step]]
            rows = np.concatenate(members)
            block = {"index": rows, **{name: np.concatenate([read_rows(a, g) for g in members]) for name, a in arrays.items()}}
            if rng is not None:
                perm = rng.permutation(len(rows))
                block = {name: values[perm] for name, values in block.items()}
            if carry is not None:
                block = {name: np.concatenate([carry[name], values]) for name, values in block.items()}
            full = len(block["index"]) // batch_size * batch_size
            for lo in range(0, full, batch_size):
                yield {name: torch.from_numpy(np.ascontiguousarray(v[lo : lo + batch_size])).to(device) for name, v in block.items()}
            carry = {name: values[full:] for name, values in block.items()}
        if carry is not None and len(carry["index"]):
            yield {name: torch.from_numpy(np.ascontiguousarray(v)).to(device) for name, v in carry.items()}

    return iterate
