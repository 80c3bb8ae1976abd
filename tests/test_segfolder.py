"""segfolder: image + mask pairs into the image store and one-hot masks (images.zarr), binary and index-coded."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lib.core.cli import progress
from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import DataParams, RuntimeParams, SegFolderParams
from lib.core.stores import open_store
from lib.data.manifest import read_dataset_info, read_manifest
from lib.data.prepare import prepare_segfolder
from lib.data.segfolder import concept_map, mask_values, read_vocabulary
from lib.evaluate.truth import GroundTruth

CLASSES = ("ball", "cup")
SIZE = 16  # stored side; the sources are 24 wide x 20 high, so the fit crops 2 columns each side


def _region(i: int) -> np.ndarray:
    """Object pixels of image i: a box that moves with i, bool (20, 24)."""
    region = np.zeros((20, 24), bool)
    region[2 + i : 10 + i, 3 + 2 * i : 15 + 2 * i] = True
    return region


def make_dataset(root: Path, encode: str = "binary") -> None:
    """Three image/mask pairs per class. encode: 'binary' (L, 255 = object) or 'rgb' (R + 256 G
    values: 1 ball / 2 cup on the object, 300 grass on the top rows, 1000 unlisted elsewhere)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        (root / "masks" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.jpg")
            if encode == "binary":
                mask = Image.fromarray((_region(i) * 255).astype(np.uint8))
            else:
                values = np.full((20, 24), 1000)
                values[:2] = 300
                values[_region(i)] = c + 1
                mask = Image.fromarray(np.stack([values % 256, values // 256, np.zeros_like(values)], -1).astype(np.uint8))
            mask.save(root / "masks" / name / f"{i}.png")
    if encode == "rgb":
        (root / "concepts.csv").write_text("value,name,type\n1,ball,object\n2,cup,object\n300,grass,background\n")


def _prepare(root: Path, out: Path, policy: str = "error", test_fraction: float = 1.0) -> tuple[Layout, object]:
    params = DataParams(
        kind="segfolder",
        name="seg",
        image_size=SIZE,
        rows_per_shard=4,
        segfolder=SegFolderParams(root=str(root), test_fraction=test_fraction, on_bad_image=policy),
    )
    layout = Layout(out)
    layout.root.mkdir(parents=True, exist_ok=True)
    with progress() as bar:
        return layout, prepare_segfolder(params, RuntimeParams(), layout, bar)


def _fitted(region: np.ndarray) -> np.ndarray:
    """Reference: PIL's fit of the region as an L image with nearest neighbour."""
    image = Image.fromarray(region.astype(np.uint8) * 255)
    return np.asarray(ImageOps.fit(image, (SIZE, SIZE), Image.Resampling.NEAREST)) > 0


def test_binary_masks_become_the_class_concept(tmp_path: Path) -> None:
    make_dataset(tmp_path / "src")
    layout, report = _prepare(tmp_path / "src", tmp_path / "out", test_fraction=0.5)
    assert report.n_images == 6 and report.split_counts == {"train": 2, "val": 0, "test": 4}

    info = read_dataset_info(layout.dataset_info)
    assert info["kind"] == "segfolder" and info["classes"] == list(CLASSES)
    assert info["concepts"] == [{"name": "ball", "type": "object"}, {"name": "cup", "type": "object"}]
    assert [(r["class_id"], r["concept_id"]) for r in info["rules"]] == [(0, 0), (1, 1)]

    manifest = read_manifest(layout.manifest)
    masks = open_store(layout.images)["masks"][:]
    assert masks.shape == (6, 2, SIZE, SIZE) and masks.dtype == np.uint8
    assert open_store(layout.images).attrs["row_order"]["shuffle_seed"] == 0  # shuffled within splits (test_row_order.py)
    for row in manifest.itertuples():
        stem = int(Path(row.source).stem)
        assert np.array_equal(masks[row.index, row.label] > 0, _fitted(_region(stem)))
        assert not masks[row.index, 1 - row.label].any()
    # the evaluate stage's segmentation target of a segfolder image is its class concept's mask
    truth = GroundTruth.from_info(info)
    labels = manifest["label"].to_numpy()
    targets = truth.class_masks(torch.from_numpy(masks[manifest["index"]]).bool(), torch.tensor(labels))
    assert torch.equal(targets, torch.from_numpy(masks[manifest["index"], labels]).bool())


def test_index_coded_rgb_masks_with_a_concept_file(tmp_path: Path) -> None:
    make_dataset(tmp_path / "src", encode="rgb")
    layout, report = _prepare(tmp_path / "src", tmp_path / "out")
    info = read_dataset_info(layout.dataset_info)
    assert [c["name"] for c in info["concepts"]] == ["ball", "cup", "grass"]
    assert [(r["class_name"], r["concept_id"], r["concept_type"]) for r in info["rules"]] == [("ball", 0, "object"), ("cup", 1, "object")]
    masks = open_store(layout.images)["masks"][:]
    labels = open_store(layout.images)["labels"][:]
    top_rows = np.zeros((20, 24), bool)
    top_rows[:2] = True
    for row in read_manifest(layout.manifest).itertuples():  # rows are shuffled: each row's source names its stem
        i, stem = row.index, int(Path(row.source).stem)
        assert np.array_equal(masks[i, labels[i]] > 0, _fitted(_region(stem)))
        assert np.array_equal(masks[i, 2] > 0, _fitted(top_rows))
    # value 1000 is not in concepts.csv: unlabelled, in no channel
    assert (masks.sum(axis=1) <= 1).all() and (masks.sum(axis=1) == 0).any()


def test_mask_values_and_lookup(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[[44, 1, 0], [0, 0, 0]]], dtype=np.uint8)).save(path)
    assert mask_values(str(path)).tolist() == [[300, 0]]
    (tmp_path / "concepts.csv").write_text("value,name,type\n300,grass,background\n5,ball,object\n")
    vocabulary = read_vocabulary(tmp_path, ["ball"])
    assert concept_map(np.array([[300, 5, 4, 9999]]), 0, vocabulary).tolist() == [[0, 1, -1, -1]]
    (tmp_path / "concepts.csv").write_text("value,name,type\n3,a,x\n3,b,x\n")
    with pytest.raises(ValueError, match="values must be distinct non-negative integers"):
        read_vocabulary(tmp_path, ["a"])


def test_bad_pairs_error_or_are_skipped(tmp_path: Path) -> None:
    make_dataset(tmp_path / "src")
    (tmp_path / "src" / "masks" / "cup" / "1.png").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "src" / "masks" / "ball" / "2.png")
    with pytest.raises(ValueError, match=r"ball/2\.png: mask is 10x10 but its image is 24x20.*on_bad_image: skip"):
        _prepare(tmp_path / "src", tmp_path / "out")
    layout, report = _prepare(tmp_path / "src", tmp_path / "out2", policy="skip")
    assert report.n_images == 4 and len(report.bad_images) == 2
    assert "cup/1.png: mask not found" in layout.bad_images.read_text()
    sources = read_manifest(layout.manifest)["source"].tolist()
    assert not any(s.endswith(("ball/2.jpg", "cup/1.jpg")) for s in sources)


def test_missing_root_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^data.segfolder.root: '.*nowhere/images' — not a directory"):
        _prepare(tmp_path / "nowhere", tmp_path / "out")
