"""Streaming rows of Zarr stores into torch batches with bounded memory.

Stages select images by store row indices (from the manifest); reads are grouped by shard so each
shard is decoded once per pass. Training passes shuffle shard order and rows inside a small
buffer of shards — the usual trade-off that keeps memory at `buffer_shards` shards whatever N is.

Reads overlap compute: `read_ahead` decodes the next blocks in reader threads (zarr's decoding
releases the GIL) while the caller computes on the current one. `runtime.num_workers` is the number
of those threads in every stage (`lib.core.device.set_reader_threads`, called by the stage set-up; 0 reads in the
calling thread). On CUDA the blocks are pinned in the reader thread so copies to the GPU are
asynchronous.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
import zarr

from lib.core.device import reader_threads

BatchSource = Callable[[], Iterator[dict[str, torch.Tensor]]]
T = TypeVar("T")
R = TypeVar("R")


def read_ahead(read: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> Iterator[R]:
    """`map(read, items)` in order, with up to `threads` reads running ahead of the consumer.

    `items` is consumed in the calling thread (so a seeded generator stays deterministic); at most
    `threads` + 1 results exist at once, which bounds memory. threads None: `reader_threads()`;
    0: every read in the calling thread, when it is asked for.
    """
    threads = reader_threads() if threads is None else threads
    if threads == 0:
        yield from map(read, items)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="store-reader")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early: drop the reads nobody will take
        pool.shutdown(wait=True, cancel_futures=True)


def host_tensor(values: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """`values` as a CPU tensor ready for `device`: pinned when it is a GPU (asynchronous copies)."""
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    return tensor.pin_memory() if torch.device(device).type == "cuda" else tensor


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

        def windows() -> Iterator[tuple[list[np.ndarray], np.ndarray | None]]:
            # drawn here, in the consuming thread and in window order, so the shuffle is the same however reads run
            for start in range(0, len(order), step):
                members = [groups[i] for i in order[start : start + step]]
                yield members, rng.permutation(sum(len(g) for g in members)) if rng is not None else None

        def read(window: tuple[list[np.ndarray], np.ndarray | None]) -> dict[str, torch.Tensor]:
            members, perm = window
            block = {name: np.concatenate([read_rows(a, g) for g in members]) for name, a in arrays.items()}
            block["index"] = np.concatenate(members)
            return {name: host_tensor(values if perm is None else values[perm], device) for name, values in block.items()}

        carry: dict[str, torch.Tensor] | None = None
        for block in read_ahead(read, windows()):
            if carry is not None:
                block = {name: torch.cat([carry[name], values]) for name, values in block.items()}
            full = len(block["index"]) // batch_size * batch_size
            for lo in range(0, full, batch_size):
                yield {name: v[lo : lo + batch_size].to(device, non_blocking=True) for name, v in block.items()}
            carry = {name: values[full:] for name, values in block.items()}
        if carry is not None and len(carry["index"]):
            yield {name: v.to(device, non_blocking=True) for name, v in carry.items()}

    return iterate
