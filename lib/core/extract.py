"""Run a batched encoder over the image store into a sharded output store (features, circles)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import zarr
from rich.progress import Progress

from lib.core.distributed import Ranks
from lib.core.stores import ShardedWriter

# uint8 images (B, H, W, 3) on the device -> {store key: {array name: (B, ...)}}
Encoder = Callable[[torch.Tensor], Mapping[str, Mapping[str, torch.Tensor]]]


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
) -> int:
    """Encode the images of every shard this rank owns that some writer lacks; write shards whole.

    ``encode`` maps a uint8 batch (B, H, W, 3) on ``device`` to ``{store key: {array: (B, ...)}}``
    with the keys of ``writers`` (several stores fill in one pass, e.g. the features of several
    layers); values are cast to each store's dtype (fp16 for features/embeddings). All writers
    share one shard layout. Returns the number of shards computed.
    """
    ranks = ranks or Ranks()
    layouts = {(w.n_items, w.rows_per_shard) for w in writers.values()}
    if len(layouts) != 1:
        raise ValueError(f"writers filled in one pass must share items and rows_per_shard, got {sorted(layouts)}")
    owed = {key: set(w.pending(ranks.rank, ranks.world_size)) for key, w in writers.items()}
    pending = sorted(set().union(*owed.values()))
    first = next(iter(writers.values()))
    task = progress.add_task(description, total=sum(first.rows(s).stop - first.rows(s).start for s in pending)) if progress else None
    for shard in pending:
        rows = first.rows(shard)
        parts: dict[tuple[str, str], list[np.ndarray]] = {}
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            batch = torch.from_numpy(images[start:stop]).to(device, non_blocking=True)
            for key, outputs in encode(batch).items():
                for name, value in outputs.items():
                    parts.setdefault((key, name), []).append(value.float().cpu().numpy())
            if progress is not None:
                progress.advance(task, stop - start)
        for key, writer in writers.items():
            if shard in owed[key]:
                writer.write(shard, {name: np.concatenate(parts[key, name]) for name in writer.specs})
    return len(pending)
