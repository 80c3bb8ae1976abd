"""The similarity stage's work: P[n, m, h, w] = cos(circle embedding, concept text embedding), fp16.

When P is materialised (``similarity.materialize`` true, or "auto" and P fits in
``similarity.max_stored_gb``) the store (data/<name>/similarity.zarr) holds "P" (N, M, G, G);
otherwise the store is a marker with the same provenance attributes and ``materialized: false``
and no arrays: P is one matmul per batch (lib.kernels.similarity.similarity_batch), so later stages
compute it on the fly from the circles and concepts stores.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zarr
from rich.progress import Progress

from lib.core.distributed import Ranks, sharded_outputs
from lib.core.extract import fill_stores
from lib.core.layout import Layout
from lib.core.params import Params, params_hash
from lib.core.schema import CIRCLES, CLIP_MODEL_KEY, EMBED_DIM_KEY, IMAGES_KEY, P, check_compatible
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.kernels.similarity import similarity_batch
from lib.pipeline.stored_concepts import read_concepts

__all__ = ["SimilarityReport", "materialize_p", "p_bytes", "run_similarity"]



def p_bytes(shape: tuple[int, int, int, int]) -> int:
    """Bytes of P (N, M, G, G) stored as fp16."""
    n, m, gh, gw = shape
    return 2 * n * m * gh * gw


def materialize_p(setting: bool | str, shape: tuple[int, int, int, int], max_stored_gb: float) -> bool:
    """Whether to store P: `setting` itself when true/false; "auto": only when it fits max_stored_gb."""
    if setting == "auto":
        return p_bytes(shape) <= max_stored_gb * 1e9
    return bool(setting)


@dataclass(frozen=True)
class SimilarityReport:
    shape: tuple[int, int, int, int]  # (N, M, G, G), whether stored or not
    materialized: bool
    shards_written: int
    setting: bool | str  # similarity.materialize

    def summary(self) -> str:
        size = f"{p_bytes(self.shape) / 1e9:.3g} GB as fp16"
        why = f" (materialize: {self.setting})" if self.setting == "auto" else ""
        if self.materialized:
            return f"P {self.shape}, {size}: stored{why}, {self.shards_written} shards written"
        return f"P {self.shape}, {size}: not stored{why}; later stages compute it on the fly"


def _write_marker(path: Path, attributes: dict[str, Any]) -> None:
    """An array-less store that `open_store` accepts: the provenance of P without P."""
    if path.exists():
        shutil.rmtree(path)
    zarr.open_group(path, mode="w", attributes={**attributes, "complete": True})


def run_similarity(
    config: Params, layout: Layout, device: torch.device, ranks: Ranks, progress: Progress | None
) -> SimilarityReport:
    """Write the similarity store from the circles and concepts stores (checked to share a CLIP first)."""
    circles = open_store(layout.circles)
    concepts = read_concepts(layout.concepts)
    check_compatible(circles.attrs, concepts.attrs)
    embeddings = circles[CIRCLES]
    n, grid = embeddings.shape[0], embeddings.shape[1]
    shape = (n, len(concepts.names), grid, grid)
    materialize = materialize_p(config.similarity.materialize, shape, config.similarity.max_stored_gb)
    fingerprint = params_hash(circles.attrs["fingerprint"], concepts.attrs["fingerprint"], str(materialize))
    attributes = {
        "stage": "similarity",
        "params_hash": fingerprint,
        CLIP_MODEL_KEY: circles.attrs[CLIP_MODEL_KEY],
        EMBED_DIM_KEY: circles.attrs[EMBED_DIM_KEY],
        IMAGES_KEY: circles.attrs.get(IMAGES_KEY),  # P's rows are the circles' rows
        "materialized": materialize,
        "concepts": list(concepts.names),
    }
    if not materialize:
        if ranks.is_main:
            _write_marker(layout.similarity, {**attributes, "fingerprint": fingerprint})
        return SimilarityReport(shape, False, 0, config.similarity.materialize)

    text = concepts.text_emb.to(device)
    spec = ArraySpec(P, shape, "float16", ("item", "concept", "grid_y", "grid_x"))
    rows = (embeddings.shards or embeddings.chunks)[0]

    def make_writers(create: bool) -> dict[str, ShardedWriter]:
        return {P: ShardedWriter(layout.similarity, [spec], rows, attributes, fingerprint, create=create)}

    def encode(batch: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        return {P: {P: similarity_batch(batch, text)}}

    with sharded_outputs(make_writers, ranks) as writers:
        filled = fill_stores(
            writers, embeddings, encode, batch_size=config.similarity.batch_size, device=device, ranks=ranks,
            progress=progress, description="similarity",
        )
    return SimilarityReport(shape, True, filled.shards, config.similarity.materialize)
