"""torchrun support: each rank writes the whole shards it owns; rank 0 creates and finalises."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lib.core.stores import ShardedWriter


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
