"""Real images: a class-per-folder tree or a CSV/parquet list, decoded (lib/data/decode.py) to fixed-size RGB."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from lib.core.params import ImageFolderParams
from lib.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb

# An image file that cannot be decoded (missing, empty, truncated, too large, ...). The same class as
# decode's DecodeError, so `except BadImageError` also catches everything decode_rgb raises.
BadImageError = DecodeError


@dataclass(frozen=True)
class ImageList:
    """Candidate images in store order with their labels and splits."""

    paths: list[str]
    labels: np.ndarray
    splits: np.ndarray
    class_names: list[str]


def scan_tree(root: Path, extensions: tuple[str, ...], key: str = "data.imagefolder.root") -> tuple[list[str], list[str], list[str]]:
    """(paths, label names, class names) of ``root/<class>/<image>``, sorted for determinism.
    Errors name the params `key` the folder came from."""
    if not root.is_dir():
        raise FileNotFoundError(f"{key}: {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{key}: {root} has no class sub-folders (expected root/<class>/<image>)")
    paths, labels = [], []
    for name in classes:
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in extensions)
        paths += [str(p) for p in files]
        labels += [name] * len(files)
    if not paths:
        raise ValueError(f"{key}: {root} holds no files with extensions {list(extensions)}")
    return paths, labels, classes


def read_list_file(path: Path) -> pd.DataFrame:
    """A CSV or parquet list with columns path, label and optionally split."""
    if not path.exists():
        raise FileNotFoundError(f"data.imagefolder.list_file: {path} not found")
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"data.imagefolder.list_file: {path} lacks columns {sorted(missing)} (needs path, label[, split])")
    base = path.parent
    frame["path"] = [str(p if Path(p).is_absolute() else base / p) for p in frame["path"]]
    return frame


def assign_splits(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Stratified, seeded split assignment: each class contributes the same fractions."""
    rng = np.random.default_rng(seed)
    splits = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        splits[members[:n_test]] = "test"
        splits[members[n_test : n_test + n_val]] = "val"
        splits[members[n_test + n_val :]] = "train"
    return splits


def list_images(params: ImageFolderParams, seed: int) -> ImageList:
    """Collect candidates, assign splits, and order them train, val, test (contiguous reads)."""
    if params.root is not None:
        paths, names, classes = scan_tree(Path(params.root), params.extensions)
        frame = pd.DataFrame({"path": paths, "label": names})
    else:
        frame = read_list_file(Path(params.list_file))
        classes = sorted(frame["label"].astype(str).unique())
    labels = frame["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    if "split" in frame.columns:
        splits = frame["split"].to_numpy(object)
    else:
        splits = assign_splits(labels, params.val_fraction, params.test_fraction, seed)
    order = np.argsort(pd.Categorical(splits, categories=["train", "val", "test"]).codes, kind="stable")
    return ImageList([frame["path"].iloc[i] for i in order], labels[order], splits[order], classes)


def load_rgb(path: str, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, exif_transpose: bool = True) -> np.ndarray:
    """Decode to RGB (`decode_rgb`: any mode, alpha over white, EXIF orientation applied), resize
    the shorter side to ``size`` and centre-crop: uint8 (size, size, 3). Raises BadImageError."""
    rgb = decode_rgb(path, max_pixels=max_pixels, exif_transpose=exif_transpose)
    fitted = ImageOps.fit(Image.fromarray(rgb), (size, size), Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8)


class DecodeDataset(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; a bad file yields ok=False and its message."""

    def __init__(self, paths: list[str], size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.paths = paths
        self.size = size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, bool, str]:
        try:
            return load_rgb(self.paths[i], self.size, max_pixels=self.max_pixels), True, ""
        except BadImageError as exc:
            return np.zeros((self.size, self.size, 3), np.uint8), False, str(exc)
