"""Run a batched encoder over the image store into sharded output stores (features, circles, ...).

Three things overlap so the device never waits for the disk: reader threads decode the next batches
(`lib.core.streams.read_ahead`, runtime.num_workers of them; pinned memory and asynchronous copies on
CUDA), the device encodes the current one, and a writer thread compresses and writes the previous
shard. Outputs are cast to the store's dtype on the device (fp16 halves the copy back) and copied
to the host without waiting. The returned `Fill` says how long the loop waited on each side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from rich.progress import Progress

from lib.core.distributed import Ranks
from lib.core.stores import ShardedWriter
from lib.core.streams import host_tensor, read_ahead

# uint8 images (B, H, W, 3) on the device -> {store key: {array name: (B, ...)}}
Encoder = Callable[[torch.Tensor], Mapping[str, Mapping[str, torch.Tensor]]]


@dataclass(frozen=True)
class Fill:
    """What one `fill_stores` call did: shards computed, images encoded and where its time went."""

    shards: int
    images: int
    seconds: float
    input_wait: float  # seconds the encode loop waited for reads
    output_wait: float  # seconds it waited for the previous shard's write

    @property
    def input_wait_share(self) -> float:
        return self.input_wait / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        rate = f"{self.images / self.seconds:.1f} images/s, " if self.seconds > 0 else ""
        return f"{rate}input wait {self.input_wait_share:.0%}, write wait {self.output_wait / max(self.seconds, 1e-9):.0%}"


class _Batch:
    """One batch's outputs on their way to the host; `ready()` waits for the device copies."""

    def __init__(self, outputs: dict[tuple[str, str], torch.Tensor], device: torch.device) -> None:
        self.outputs = outputs
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        if self.event is not None:
            self.event.record()

    def ready(self) -> dict[tuple[str, str], torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.outputs


def _to_host(value: torch.Tensor, dtype: str) -> torch.Tensor:
    # the cast happens on the device; a non-blocking copy to the CPU lands in pinned memory
    return value.to(getattr(torch, dtype)).to("cpu", non_blocking=True)


@torch.inference_mode()
def fill_stores(
    writers: Mapping[str, ShardedWriter],
    images: zarr.Array,
    encode: Encoder,
    *,
    batch_size: int,
    device: torch.device,
    ranks: Ranks | None = None,
    progress: Progress | None = None,
    description: str = "encode",
) -> Fill:
    """Encode the images of every shard this rank owns that some writer lacks; write shards whole.

    ``encode`` maps a uint8 batch (B, H, W, 3) on ``device`` to ``{store key: {array: (B, ...)}}``
    with the keys of ``writers`` (several stores fill in one pass, e.g. the features of several
    layers); values are cast to each store's dtype (fp16 for features/embeddings). All writers
    share one shard layout. The bytes written do not depend on the reader threads or on timing.
    """
    ranks = ranks or Ranks()
    layouts = {(w.n_items, w.rows_per_shard) for w in writers.values()}
    if len(layouts) != 1:
        raise ValueError(f"writers filled in one pass must share items and rows_per_shard, got {sorted(layouts)}")
    owed = {key: set(w.pending(ranks.rank, ranks.world_size)) for key, w in writers.items()}
    pending = sorted(set().union(*owed.values()))
    first = next(iter(writers.values()))
    spans = [(shard, start, min(start + batch_size, first.rows(shard).stop))
             for shard in pending for start in range(first.rows(shard).start, first.rows(shard).stop, batch_size)]
    total = sum(stop - start for _, start, stop in spans)
    task = progress.add_task(description, total=total) if progress else None

    def read(span: tuple[int, int, int]) -> torch.Tensor:
        return host_tensor(images[span[1] : span[2]], device)

    def write(shard: int, batches: list[_Batch]) -> None:
        parts = [batch.ready() for batch in batches]
        for key, writer in writers.items():
            if shard in owed[key]:
                writer.write(shard, {name: np.concatenate([p[key, name].numpy() for p in parts]) for name in writer.specs})

    began = time.perf_counter()
    input_wait = output_wait = 0.0
    batches: list[_Batch] = []
    writing: Future[None] | None = None
    reads: Iterator[torch.Tensor] = read_ahead(read, spans)
    with ThreadPoolExecutor(1, thread_name_prefix="store-writer") as writer_thread:
        for index, (shard, start, stop) in enumerate(spans):
            waited = time.perf_counter()
            batch = next(reads).to(device, non_blocking=True)
            input_wait += time.perf_counter() - waited
            outputs = encode(batch)
            batches.append(_Batch({(key, name): _to_host(value, writers[key].specs[name].dtype)
                                   for key, arrays in outputs.items() for name, value in arrays.items()}, device))
            if progress is not None:
                progress.advance(task, stop - start)
            if index + 1 < len(spans) and spans[index + 1][0] == shard:
                continue
            waited = time.perf_counter()
            if writing is not None:  # one shard in flight: bounded memory, and a failed write stops the loop
                writing.result()
            output_wait += time.perf_counter() - waited
            writing, batches = writer_thread.submit(write, shard, batches), []
        waited = time.perf_counter()
        if writing is not None:
            writing.result()
        output_wait += time.perf_counter() - waited
    return Fill(len(pending), total, time.perf_counter() - began, input_wait, output_wait)
