"""prepare: imagefolder decoding with bad files (both policies), and the toy world end to end."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lib.core.cli import progress
from lib.core.layout import Layout
from lib.core.params import DataParams, ImageFolderParams, RuntimeParams
from lib.core.stores import open_store
from lib.data.manifest import read_manifest, split_indices
from lib.data.prepare import prepare_imagefolder, prepare_toy


def make_tree(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    truncated = root / "dog" / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    empty = root / "cat" / "empty.png"
    empty.write_bytes(b"")
    return {"truncated": truncated, "empty": empty}


def data_params(root: Path, policy: str) -> DataParams:
    folder = ImageFolderParams(root=str(root), val_fraction=0.2, test_fraction=0.2, on_bad_image=policy)
    return DataParams(kind="imagefolder", name="real", image_size=32, rows_per_shard=4, imagefolder=folder)


def test_imagefolder_bad_file_is_an_error_naming_it(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    layout = Layout(tmp_path / "out")
    layout.root.mkdir()
    with progress() as bar, pytest.raises(ValueError, match=r"(empty\.png: empty file|truncated\.jpg: cannot decode).*on_bad_image: skip"):
        prepare_imagefolder(data_params(tmp_path / "images", "error"), RuntimeParams(), layout, bar)


def test_imagefolder_skip_lists_bad_files_and_leaves_them_out(tmp_path: Path) -> None:
    bad = make_tree(tmp_path / "images")
    layout = Layout(tmp_path / "out")
    layout.root.mkdir()
    with progress() as bar:
        report = prepare_imagefolder(data_params(tmp_path / "images", "skip"), RuntimeParams(), layout, bar)
    assert report.n_images == 12 and len(report.bad_images) == 2
    listed = layout.bad_images.read_text()
    assert str(bad["truncated"]) in listed and str(bad["empty"]) in listed
    manifest = read_manifest(layout.manifest)
    assert len(manifest) == 12 and not manifest["source"].str.contains("truncated|empty").any()
    assert sorted(manifest["split"].value_counts().to_dict().items()) == [("test", 2), ("train", 8), ("val", 2)]
    images = open_store(layout.images)["images"]
    assert images.shape == (14, 32, 32, 3)
    # a stored row is its source file, shorter side resized and centre-cropped
    row = manifest.iloc[0]
    expected = ImageOps.fit(Image.open(row["source"]).convert("RGB"), (32, 32), Image.Resampling.BICUBIC)
    assert np.array_equal(images[int(row["index"])], np.asarray(expected))
    assert layout.preview.stat().st_size > 0


def test_toy_prepare_is_deterministic_and_consistent(tmp_path: Path) -> None:
    params = DataParams(toy={"n_train": 40, "n_val": 10, "n_test": 10}, rows_per_shard=16)
    runs = []
    for name in ("a", "b"):
        layout = Layout(tmp_path / name)
        layout.root.mkdir()
        with progress() as bar:
            prepare_toy(params, layout, bar)
        runs.append(layout)
    first, second = (open_store(layout.images)["images"][:] for layout in runs)
    assert np.array_equal(first, second)
    manifest = read_manifest(runs[0].manifest)
    assert list(split_indices(manifest, "val")) == list(range(40, 50))
    labels = open_store(runs[0].images)["labels"][:]
    assert np.array_equal(manifest["label"].to_numpy(), labels)
    masks = open_store(runs[0].images)["masks"]
    assert masks.shape == (60, 17, 64, 64)
    assert runs[0].preview.exists() and runs[0].dataset_info.exists()
