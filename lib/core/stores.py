"""Sharded, resumable Zarr v3 stores.

A store is a Zarr group of arrays that share their first axis (the item axis: images). It is
written one *shard* — a block of `rows_per_shard` items across every array — at a time, so each
array holds one file per shard (tens to hundreds of files, which DVC hashes quickly) and every
write covers whole shards (partial-shard writes are where zarr/dask have lost data).

Resumability: a store is built in a scratch folder outside the stage's declared outputs
(``<dir>/.partial/<name>`` unless the caller names another, e.g. ``Layout.scratch``), so DVC, which
deletes a stage's outputs before running it, never deletes unfinished work, and stages need no
`persist` (which would switch off DVC's run-cache). After a shard's blocks are written (zarr's
local store writes files atomically) its entry of the `shard_done` array is set; that array has
one chunk (one file) per shard, so torchrun ranks writing different shards never touch the same
file. A rerun with the same fingerprint skips marked shards; one with a different fingerprint
starts afresh. `finalize` sets the group attribute `complete` and moves the store into place with
one atomic rename; readers refuse a store without `complete`, so a crash never leaves a store
that looks complete. Resumed and uninterrupted runs produce identical bytes.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from lib.core.errors import UserError

DONE_ARRAY = "shard_done"
SCRATCH_DIR = ".partial"  # unfinished stores; outside DVC outputs, ignored by git and DVC
# Inner chunks inside a shard: small enough to read a few items without decoding a whole shard.
DEFAULT_CHUNK_ROWS = 16


class IncompleteStoreError(UserError):
    """Raised when reading a store whose writer has not finished."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store: its name, full shape (items first), dtype and axis names."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dimension_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.dimension_names):
            raise ValueError(f"array '{self.name}': shape {self.shape} and dimension_names {self.dimension_names} differ in length")


class ShardedWriter:
    """Create or resume a store and write it shard by shard.

    Args:
        path: folder of the Zarr group (e.g. ``data/toy/images.zarr``).
        arrays: the arrays; all share ``shape[0]`` (the item count).
        rows_per_shard: items per shard file.
        attributes: provenance written to the group (stage, params hash, model id, ...).
        fingerprint: what the content depends on; a store with another fingerprint is rebuilt.
        create: False for a non-zero torchrun rank, which opens the store rank 0 created.
        scratch: where the unfinished store lives (default ``<path's folder>/.partial/<name>``);
            it must lie outside the stage's DVC outputs.
    """

    def __init__(
        self,
        path: str | Path,
        arrays: Sequence[ArraySpec],
        rows_per_shard: int,
        attributes: Mapping[str, Any],
        fingerprint: str,
        create: bool = True,
        scratch: str | Path | None = None,
    ) -> None:
        if not arrays:
            raise ValueError("a store needs at least one array")
        items = {spec.shape[0] for spec in arrays}
        if len(items) != 1:
            raise ValueError(f"arrays of one store must share their first axis, got {sorted(items)}")
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be > 0, got {rows_per_shard}")
        self.path = Path(path)
        self.scratch = Path(scratch) if scratch is not None else default_scratch(self.path)
        self.specs = {spec.name: spec for spec in arrays}
        self.n_items = items.pop()
        self.rows_per_shard = rows_per_shard
        self.n_shards = max(1, -(-self.n_items // rows_per_shard))
        self.fingerprint = fingerprint
        # A finished store of the same content is kept as it is: nothing is pending.
        self.finished = self._matches(self.path, complete=True)
        where = self.path if self.finished else self.scratch
        if create and not self.finished and not self._matches(self.scratch, complete=False):
            self._create(dict(attributes))
        self.group = zarr.open_group(where, mode="r+")
        self.arrays = {name: self.group[name] for name in self.specs}
        self.done = self.group[DONE_ARRAY]

    def _matches(self, path: Path, complete: bool) -> bool:
        """Whether `path` holds this writer's store (same fingerprint and arrays), finished or not."""
        try:
            group = zarr.open_group(path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return False
        if group.attrs.get("fingerprint") != self.fingerprint or bool(group.attrs.get("complete")) != complete:
            return False
        return all(
            DONE_ARRAY in group
            and name in group
            and tuple(group[name].shape) == spec.shape and str(group[name].dtype) == spec.dtype
            for name, spec in self.specs.items()
        )

    def _create(self, attributes: dict[str, Any]) -> None:
        # Scratch of an abandoned run (another fingerprint) is dropped here.
        if self.scratch.exists():
            shutil.rmtree(self.scratch)
        self.scratch.parent.mkdir(parents=True, exist_ok=True)
        attributes.update(fingerprint=self.fingerprint, complete=False, rows_per_shard=self.rows_per_shard)
        group = zarr.open_group(self.scratch, mode="w", attributes=attributes)
        for spec in self.specs.values():
            chunk_rows = math.gcd(DEFAULT_CHUNK_ROWS, self.rows_per_shard)  # inner chunks must tile a shard
            group.create_array(
                name=spec.name,
                shape=spec.shape,
                dtype=spec.dtype,
                shards=(self.rows_per_shard, *spec.shape[1:]),
                chunks=(chunk_rows, *spec.shape[1:]),
                compressors=ZstdCodec(level=3),
                dimension_names=spec.dimension_names,
                fill_value=0,
            )
        group.create_array(name=DONE_ARRAY, shape=(self.n_shards,), dtype="uint8", chunks=(1,), fill_value=0)

    def rows(self, shard: int) -> slice:
        """The item range a shard covers."""
        start = shard * self.rows_per_shard
        return slice(start, min(start + self.rows_per_shard, self.n_items))

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards not yet written that this rank owns (round-robin over ranks)."""
        done = self.done[:]
        return [s for s in range(rank, self.n_shards, world_size) if not done[s]]

    def write(self, shard: int, blocks: Mapping[str, np.ndarray]) -> None:
        """Write one whole shard of every array, then mark it done."""
        if set(blocks) != set(self.specs):
            raise ValueError(f"shard {shard}: expected blocks for {sorted(self.specs)}, got {sorted(blocks)}")
        rows = self.rows(shard)
        for name, block in blocks.items():
            expected = (rows.stop - rows.start, *self.specs[name].shape[1:])
            if tuple(block.shape) != expected:
                raise ValueError(f"shard {shard} of '{name}': block shape {tuple(block.shape)}, expected {expected}")
            self.arrays[name][rows] = np.asarray(block, dtype=self.specs[name].dtype)
        self.done[shard] = 1

    def finalize(self, extra_attributes: Mapping[str, Any] | None = None) -> None:
        """Mark the store complete and move it into place atomically; refuses while any shard is missing."""
        if self.finished:
            return
        missing = self.pending()
        if missing:
            raise IncompleteStoreError(f"{self.path}: {len(missing)} of {self.n_shards} shards not written (first: {missing[0]})")
        self.group.attrs.update({**(extra_attributes or {}), "complete": True})
        publish(self.scratch, self.path)
        self.finished = True
        self.group = zarr.open_group(self.path, mode="r+")
        self.arrays = {name: self.group[name] for name in self.specs}
        self.done = self.group[DONE_ARRAY]

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete"))


def default_scratch(path: Path) -> Path:
    """Where a store is built before it is published: ``<folder>/.partial/<name>``."""
    return path.parent / SCRATCH_DIR / path.name


def publish(scratch: Path, path: Path) -> None:
    """Move a finished store from `scratch` to `path` with one rename (the old one, if any, is
    renamed away first and deleted after), so `path` is never a half-written store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = scratch.with_name(scratch.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    scratch.rename(path)
    if old.exists():
        shutil.rmtree(old)
    remove_empty_scratch_dirs(scratch.parent)


def remove_empty_scratch_dirs(folder: Path) -> None:
    """Remove `folder` and its parents up to the `.partial` dir while they are empty, so a finished
    run leaves no empty scratch folders; one still holding another store's work is kept."""
    for directory in (folder, *folder.parents):
        if SCRATCH_DIR not in directory.parts:
            return
        try:
            directory.rmdir()
        except OSError:  # not empty (or already gone): another store is under way there
            return
        if directory.name == SCRATCH_DIR:
            return


def _unfinished(path: Path) -> Path | None:
    """The scratch copy of `path` an interrupted stage left, if any (``<ancestor>/.partial/<rest>``)."""
    for ancestor in list(path.parents)[:3]:
        candidate = ancestor / SCRATCH_DIR / path.relative_to(ancestor)
        if (candidate / "zarr.json").is_file():
            return candidate
    return None


def open_store(path: str | Path) -> zarr.Group:
    """Open a finished store read-only; refuse a missing or incomplete one with a clear error."""
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        unfinished = _unfinished(path)
        if unfinished is not None:
            group = zarr.open_group(unfinished, mode="r")
        else:
            raise IncompleteStoreError(f"{path}: no store here; run the stage that writes it (dvc repro)") from None
    if not group.attrs.get("complete"):
        done = int(group[DONE_ARRAY][:].sum()) if DONE_ARRAY in group else 0
        raise IncompleteStoreError(
            f"{path}: store is incomplete ({done} shards finished); its stage was interrupted — "
            "rerun it (it resumes from the last finished shard)"
        )
    return group


def dask_view(array: zarr.Array) -> da.Array:
    """A lazy dask array over a store array, one dask chunk per shard."""
    return da.from_zarr(array, chunks=(array.shards or array.chunks))
