"""Streaming batches: every selected row exactly once per pass, values intact, reproducible shuffles."""

from pathlib import Path

import numpy as np
import zarr

from lib.core.streams import batch_source, read_rows, shard_groups


def make_array(tmp_path: Path) -> zarr.Array:
    array = zarr.create_array(tmp_path / "a.zarr", shape=(100, 2), dtype="int64", shards=(16, 2), chunks=(8, 2))
    array[:] = np.stack([np.arange(100), -np.arange(100)], axis=1)
    return array


def test_shard_groups_and_read_rows(tmp_path: Path) -> None:
    array = make_array(tmp_path)
    groups = shard_groups(np.array([40, 3, 17, 15, 16, 99]), 16)
    assert [g.tolist() for g in groups] == [[3, 15], [16, 17], [40], [99]]
    assert read_rows(array, np.array([5, 6, 7]))[:, 0].tolist() == [5, 6, 7]
    assert read_rows(array, np.array([5, 9, 70]))[:, 1].tolist() == [-5, -9, -70]


def test_batch_source_covers_rows_once_and_shuffles_reproducibly(tmp_path: Path) -> None:
    array = make_array(tmp_path)
    indices = np.setdiff1d(np.arange(100), [7, 50, 51])
    ordered = list(batch_source({"a": array}, indices, 10)())
    assert np.concatenate([b["index"].numpy() for b in ordered]).tolist() == indices.tolist()
    for batch in ordered:
        assert np.array_equal(batch["a"][:, 0].numpy(), batch["index"].numpy())

    source = batch_source({"a": array}, indices, 10, shuffle=True, seed=3, buffer_shards=2)
    first, second = ([b["index"].numpy() for b in source()] for _ in range(2))
    for batches in (first, second):
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == indices.tolist()
        assert all(len(b) == 10 for b in batches[:-1])
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))  # a new order per pass
    again = batch_source({"a": array}, indices, 10, shuffle=True, seed=3, buffer_shards=2)
    assert np.array_equal(np.concatenate([b["index"].numpy() for b in again()]), np.concatenate(first))


def test_reads_ahead_in_order_and_the_same_batches_with_any_reader_threads(tmp_path: Path) -> None:
    import time

    from lib.core.device import reader_threads, set_reader_threads
    from lib.core.streams import read_ahead

    def slow(i: int) -> int:
        time.sleep(0.002 * (i % 3))  # later items often finish first
        return i * i

    assert list(read_ahead(slow, range(20), threads=3)) == [i * i for i in range(20)]
    array = make_array(tmp_path)
    indices = np.setdiff1d(np.arange(100), [7, 50, 51])
    passes, before = [], reader_threads()
    for threads in (0, 3):
        set_reader_threads(threads)
        source = batch_source({"a": array}, indices, 10, shuffle=True, seed=5, buffer_shards=2)
        passes.append([b["a"].numpy() for b in source()])
    set_reader_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(*passes, strict=True))
