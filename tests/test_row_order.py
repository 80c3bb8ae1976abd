"""prepare stores real images in a seeded random order within each split, so shards and batches mix the classes."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import chisquare

from lib.core.cli import progress
from lib.core.layout import Layout
from lib.core.params import DataParams, ImageFolderParams, RuntimeParams
from lib.core.stores import open_store
from lib.data.imagefolder import list_images, store_order
from lib.data.manifest import read_manifest
from lib.data.prepare import prepare_imagefolder

K, PER_CLASS, SHARD, BATCH = 20, 100, 200, 32


def class_sorted_list(folder: Path, splits: bool = False) -> Path:
    """A list file of K classes x PER_CLASS images, class after class (as ImageNet's folders list them)."""
    labels = np.repeat([f"n{c:08d}" for c in range(K)], PER_CLASS)
    frame = pd.DataFrame({"path": [f"{label}/{i}.jpg" for i, label in enumerate(labels)], "label": labels})
    if splits:
        frame["split"] = np.tile(["train"] * 80 + ["val"] * 10 + ["test"] * 10, K)
    path = folder / "list.csv"
    frame.to_csv(path, index=False)
    return path


def assert_mixed(labels: np.ndarray) -> None:
    """Every shard's class counts pass a chi-square test against uniform (p > 0.001 per shard), and a
    batch of BATCH rows sees on average at least 0.9 x the classes a perfect shuffle gives,
    K (1 - (1 - 1/K)^B) (each class is in a batch with probability 1 - (1 - 1/K)^B)."""
    for start in range(0, len(labels), SHARD):
        counts = np.bincount(labels[start : start + SHARD], minlength=K)
        assert chisquare(counts).pvalue > 1e-3, f"shard at row {start}: class counts {counts.tolist()}"
    seen = [len(np.unique(labels[i : i + BATCH])) for i in range(0, len(labels) - BATCH + 1, BATCH)]
    assert np.mean(seen) >= 0.9 * K * (1 - (1 - 1 / K) ** BATCH)


def test_class_sorted_list_gives_shards_and_batches_of_mixed_classes(tmp_path: Path) -> None:
    listing = list_images(ImageFolderParams(list_file=str(class_sorted_list(tmp_path)), val_fraction=0.0, test_fraction=0.0), seed=0)
    assert sorted(listing.labels.tolist()) == np.repeat(np.arange(K), PER_CLASS).tolist()  # a permutation of the list
    assert_mixed(listing.labels)


def test_the_check_fails_on_the_lists_order(tmp_path: Path) -> None:
    params = ImageFolderParams(list_file=str(class_sorted_list(tmp_path)), val_fraction=0.0, test_fraction=0.0, shuffle_seed=None)
    listing = list_images(params, seed=0)
    assert np.array_equal(listing.labels, np.repeat(np.arange(K), PER_CLASS))  # null keeps the list's order
    with pytest.raises(AssertionError):
        assert_mixed(listing.labels)


def test_splits_stay_contiguous_and_each_is_shuffled(tmp_path: Path) -> None:
    listing = list_images(ImageFolderParams(list_file=str(class_sorted_list(tmp_path, splits=True))), seed=0)
    n_train = 80 * K
    assert listing.splits[:n_train].tolist() == ["train"] * n_train and listing.splits[-10 * K :].tolist() == ["test"] * 10 * K
    assert_mixed(listing.labels[:n_train])
    # the same seed gives the same order (and hash); another seed another one
    order, record = store_order(listing.splits, 0)
    again, same = store_order(listing.splits, 0)
    other, changed = store_order(listing.splits, 1)
    assert np.array_equal(order, again) and record == same and record["shuffle_seed"] == 0
    assert not np.array_equal(order, other) and changed["permutation_sha256"] != record["permutation_sha256"]


def test_prepare_stores_rows_in_the_shuffled_order_and_records_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in range(4):  # the image of class c is filled with grey level 40 c, so a row shows its class
        (tmp_path / "images" / f"class{c}").mkdir(parents=True)
        for i in range(5):
            pixels = np.full((20, 20, 3), 40 * c, np.uint8) + rng.integers(0, 2, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / f"class{c}" / f"{i}.png")
    folder = ImageFolderParams(root=str(tmp_path / "images"), val_fraction=0.0, test_fraction=0.0, shuffle_seed=3)
    params = DataParams(kind="imagefolder", name="real", image_size=16, rows_per_shard=8, imagefolder=folder)
    layout = Layout(tmp_path / "out")
    layout.root.mkdir()
    with progress() as bar:
        prepare_imagefolder(params, RuntimeParams(num_workers=0), layout, bar)
    store = open_store(layout.images)
    labels = store["labels"][:]
    assert labels.tolist() != sorted(labels.tolist())  # not class after class
    assert np.array_equal(store["images"][:].reshape(20, -1).mean(axis=1).round() // 40, labels)  # pixels match labels
    manifest = read_manifest(layout.manifest)
    assert [int(Path(s).parent.name[-1]) for s in manifest["source"]] == labels.tolist()
    _, record = store_order(np.array(["train"] * 20, dtype=object), 3)
    assert store.attrs["row_order"] == record
