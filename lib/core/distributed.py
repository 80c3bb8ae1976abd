"""torchrun support: each rank writes the whole shards it owns (rank 0 creates and finalises the stores);
training stages split the data by shard and train with DDP."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lib.core.stores import ShardedWriter

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """Read torchrun's environment; start a process group (gloo on CPU, nccl on CUDA) when needed.

    Returns the ranks and this rank's device: on CUDA each rank takes ``cuda:LOCAL_RANK``, so
    K ranks on a K-GPU machine do not all land on the first GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()


@contextmanager
def sharded_outputs(
    make_writers: Callable[[bool], dict[str, ShardedWriter]], ranks: Ranks
) -> Iterator[dict[str, ShardedWriter]]:
    """Rank 0 creates (or resumes) the stores, every rank writes its shards, rank 0 finalises.

    ``make_writers(create)`` builds the writers; only rank 0 may create or reset a store, the
    other ranks open them after the first barrier. Finalising waits for every rank, so a store
    is marked complete only when all shards of all ranks are written.
    """
    writers = make_writers(True) if ranks.is_main else None
    barrier(ranks)
    if writers is None:
        writers = make_writers(False)
    yield writers
    barrier(ranks)
    if ranks.is_main:
        for writer in writers.values():
            writer.finalize()


# ---------------------------------------------------------------------------------------------
# training under torchrun: data split by shard, DDP, and losses over the global batch
def rank_rows(rows: np.ndarray, rows_per_shard: int, ranks: Ranks) -> np.ndarray:
    """This rank's part of the sorted store rows `rows`: the whole shards it owns (round-robin), so
    every rank reads only its own shard files."""
    if ranks.world_size == 1:
        return rows
    rows = np.sort(np.asarray(rows))
    return rows[(rows // rows_per_shard) % ranks.world_size == ranks.rank]


def data_parallel(module: nn.Module, ranks: Ranks) -> nn.Module:
    """`module` wrapped in DistributedDataParallel when there are several ranks (gradients averaged over
    ranks in the backward), else itself. Train through the returned module's forward."""
    if ranks.world_size == 1:
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def gather_batch(local: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The global batch: every rank's `local` (same shape on every rank) concatenated in rank order.

    Differentiable: a loss of the global batch computed on every rank, backpropagated and averaged by
    DDP, gives exactly the gradient of that loss on one process (for losses that do not decompose
    over examples, e.g. ones that centre or normalise across the batch)."""
    if ranks.world_size == 1:
        return local
    return torch.cat(dist_nn.all_gather(local.contiguous()))


def reduce_sum(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum of `value` over ranks (differentiable, as `gather_batch`)."""
    return value if ranks.world_size == 1 else dist_nn.all_reduce(value)


def reduce_(value: torch.Tensor, ranks: Ranks, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a tensor without gradient ("sum", "min" or "max"); returns it."""
    if ranks.world_size > 1:
        dist.all_reduce(value, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return value


def gather_objects(value: object, ranks: Ranks) -> list[object]:
    """[every rank's `value`] in rank order, on every rank (picklable values: per-rank partial results)."""
    if ranks.world_size == 1:
        return [value]
    values: list[object] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def in_lockstep(batches: Iterable[T], ranks: Ranks) -> Iterator[T]:
    """`batches` for as long as every rank still has one: under DDP all ranks must take the same
    number of steps, and ranks' parts of a split may differ by a batch (one flag all-reduce per step)."""
    if ranks.world_size == 1:
        yield from batches
        return
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    for batch in itertools.chain(batches, [None]):
        flag = torch.tensor(int(batch is not None), device=device)
        if not reduce_(flag, ranks, "min").item():
            return
        yield batch
