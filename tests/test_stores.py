"""Sharded store: whole-shard writes, crash + resume equals a clean run, incomplete stores refused."""

from pathlib import Path

import numpy as np
import pytest

from lib.core.stores import ArraySpec, IncompleteStoreError, ShardedWriter, dask_view, open_store

N, ROWS = 70, 16  # 5 shards, the last one partial


def specs() -> list[ArraySpec]:
    return [
        ArraySpec("x", (N, 3, 4, 4), "float16", ("item", "c", "y", "x")),
        ArraySpec("label", (N,), "int64", ("item",)),
    ]


def block(rows: slice) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows.start)  # content depends only on the rows, as in a real stage
    return {"x": rng.standard_normal((rows.stop - rows.start, 3, 4, 4)), "label": np.arange(rows.start, rows.stop)}


def write_all(path: Path, crash_after: int | None = None) -> ShardedWriter:
    writer = ShardedWriter(path, specs(), ROWS, {"stage": "test"}, fingerprint="v1")
    for count, shard in enumerate(writer.pending()):
        if crash_after is not None and count == crash_after:
            raise RuntimeError("injected crash")
        writer.write(shard, block(writer.rows(shard)))
    writer.finalize()
    return writer


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_crash_then_resume_gives_identical_bytes(tmp_path: Path) -> None:
    clean = tmp_path / "clean.zarr"
    write_all(clean)
    crashed = tmp_path / "crashed.zarr"
    with pytest.raises(RuntimeError, match="injected"):
        write_all(crashed, crash_after=2)
    with pytest.raises(IncompleteStoreError, match="incomplete \\(2 shards finished\\)"):
        open_store(crashed)
    resumed = ShardedWriter(crashed, specs(), ROWS, {"stage": "test"}, fingerprint="v1")
    assert resumed.pending() == [2, 3, 4]  # the finished shards are skipped
    for shard in resumed.pending():
        resumed.write(shard, block(resumed.rows(shard)))
    resumed.finalize()
    assert files(crashed) == files(clean)


def test_store_layout_and_reading(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write_all(path)
    group = open_store(path)
    assert group["x"].shards == (ROWS, 3, 4, 4)
    assert group["x"].metadata.dimension_names == ("item", "c", "y", "x")
    assert group.attrs["stage"] == "test" and group.attrs["complete"] is True
    # one file per shard per array (+ metadata and the done markers): never one per item
    assert len(list((path / "x").rglob("c/*"))) <= 5
    lazy = dask_view(group["x"])
    assert lazy.chunks[0] == (16, 16, 16, 16, 6)
    np.testing.assert_array_equal(lazy[20:30].compute(), group["x"][20:30])


def test_finalize_refuses_missing_shards_and_bad_blocks(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path / "s.zarr", specs(), ROWS, {}, fingerprint="v1")
    writer.write(0, block(writer.rows(0)))
    with pytest.raises(IncompleteStoreError, match="4 of 5 shards not written"):
        writer.finalize()
    with pytest.raises(ValueError, match="block shape"):
        writer.write(1, {"x": np.zeros((3, 3, 4, 4)), "label": np.zeros(16)})
    with pytest.raises(ValueError, match="expected blocks"):
        writer.write(1, {"x": np.zeros((16, 3, 4, 4))})


def test_changed_fingerprint_rebuilds(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write_all(path)
    writer = ShardedWriter(path, specs(), ROWS, {}, fingerprint="v2")
    assert writer.pending() == [0, 1, 2, 3, 4] and not writer.complete


def test_missing_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IncompleteStoreError, match="no store here"):
        open_store(tmp_path / "nothing.zarr")


def test_any_rows_per_shard_works(tmp_path: Path) -> None:
    """Inner chunks must tile a shard: 100 rows per shard is not a multiple of the chunk size 16."""
    spec = [ArraySpec("x", (250, 2), "float32", ("item", "c"))]
    writer = ShardedWriter(tmp_path / "s.zarr", spec, 100, {}, fingerprint="v1")
    for shard in writer.pending():
        rows = writer.rows(shard)
        writer.write(shard, {"x": np.arange(rows.start * 2, rows.stop * 2).reshape(-1, 2)})
    writer.finalize()
    assert np.array_equal(open_store(tmp_path / "s.zarr")["x"][:], np.arange(500).reshape(250, 2))


def test_publishing_leaves_no_empty_scratch_folders_but_keeps_others_work(tmp_path: Path) -> None:
    """Layout.scratch nests (data/<name>/.partial/features/layer3.zarr): the folders a published store
    leaves empty go, up to .partial; a folder holding another store under way stays."""
    root = tmp_path / "data"
    first, second = root / "features" / "a.zarr", root / "features" / "b.zarr"
    writers = [ShardedWriter(p, specs(), ROWS, {}, fingerprint="v1", scratch=root / ".partial" / "features" / p.name)
               for p in (first, second)]
    for writer in writers:
        writer.write(0, block(writer.rows(0)))  # both under way
    for shard in writers[0].pending():
        writers[0].write(shard, block(writers[0].rows(shard)))
    writers[0].finalize()
    assert open_store(first).attrs["complete"] is True
    assert (root / ".partial" / "features" / "b.zarr").is_dir()  # the other store's shard survives
    for shard in writers[1].pending():
        writers[1].write(shard, block(writers[1].rows(shard)))
    writers[1].finalize()
    assert not (root / ".partial").exists()
