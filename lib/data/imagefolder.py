"""Real images: a class-per-folder tree or a CSV/parquet list, decoded (lib/data/decode.py) to fixed-size RGB."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from lib.core.errors import UserError
from lib.core.layout import SPLITS
from lib.core.params import DataParams, ImageFolderParams
from lib.data.decode import DEFAULT_MAX_PIXELS, DecodeError, ImageTooLargeError, decode_rgb

LIST_COLUMNS = ("path", "label", "split")
LIST_KEY = "data.imagefolder.list_file"

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
    row_order: dict[str, object]  # how the rows were ordered (store_order), for the store's provenance


def _require(path: Path, key: str, *, folder: bool) -> None:
    """A UserError naming `key` unless `path` is an existing folder (or file)."""
    if folder and not path.is_dir():
        raise UserError("not a directory", key=key, value=str(path), fix="point it at a folder of class folders, <folder>/<class>/<image>")
    if not folder and not path.is_file():
        raise UserError("file not found", key=key, value=str(path), fix="set it to a CSV or parquet file of path,label[,split]")


def check_source(data: DataParams) -> None:
    """The image source the `data` section names exists (before any listing or decoding)."""
    if data.kind == "imagefolder" and data.imagefolder.root is not None:
        _require(Path(data.imagefolder.root), "data.imagefolder.root", folder=True)
    elif data.kind == "imagefolder":
        _require(Path(data.imagefolder.list_file), LIST_KEY, folder=False)
    elif data.kind == "segfolder":
        _require(Path(data.segfolder.root) / "images", "data.segfolder.root", folder=True)


def scan_tree(root: Path, extensions: tuple[str, ...], key: str = "data.imagefolder.root") -> tuple[list[str], list[str], list[str]]:
    """(paths, label names, class names) of ``root/<class>/<image>``, sorted for determinism.

    Hidden folders (".ipynb_checkpoints") are not classes. Errors are UserErrors naming the params
    `key` the folder came from: not a folder, fewer than two class folders (a classifier needs
    two), a class folder without images."""
    _require(root, key, folder=True)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {name: sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in extensions) for name in classes}
    if len(classes) < 2:
        raise UserError(
            f"{len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a classifier needs at least 2",
            key=key, value=str(root), fix="put the images in one sub-folder per class, root/<class>/<image>, for two classes or more",
        )
    empty = [name for name, files in found.items() if not files]
    if empty:
        section = key.rpartition(".")[0]
        raise UserError(
            f"class folders without images ({', '.join(extensions)}): {', '.join(empty)}", key=key, value=str(root),
            fix=f"add images to them, remove them, or add their file types to {section}.extensions",
        )
    paths = [str(p) for name in classes for p in found[name]]
    labels = [name for name in classes for _ in found[name]]
    return paths, labels, classes


def read_list_file(path: Path) -> pd.DataFrame:
    """A CSV or parquet list with columns path, label and optionally split (train, val or test).

    Errors are UserErrors naming data.imagefolder.list_file: the file is missing, lacks a column,
    has a column besides these (a typo such as 'spilt' would silently assign random splits) or an
    unknown split."""
    _require(path, LIST_KEY, folder=False)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    columns = [str(c) for c in frame.columns]
    unknown = [c for c in columns if c not in LIST_COLUMNS]
    missing = [c for c in LIST_COLUMNS[:2] if c not in columns]
    if unknown or missing:
        guesses = {c: difflib.get_close_matches(c, LIST_COLUMNS, n=1) for c in unknown}
        named = ", ".join(f"{c!r} (did you mean {g[0]!r}?)" if g else repr(c) for c, g in guesses.items())
        parts = (f"unknown columns {named}" if unknown else "", f"missing columns {missing}" if missing else "")
        problem = "; ".join(part for part in parts if part)
        raise UserError(f"{problem}; allowed: path, label, split (optional)", key=LIST_KEY, value=str(path),
                        fix="rename or drop the other columns (split, when given, is train, val or test)")
    if "split" in columns:
        bad = sorted(set(frame["split"].astype(str)) - set(SPLITS))
        if bad:
            raise UserError(f"unknown split values {bad}; allowed: {', '.join(SPLITS)}", key=LIST_KEY, value=str(path),
                            fix="use train, val or test in the split column, or drop it to split at random (val_fraction, test_fraction)")
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


def store_order(splits: np.ndarray, shuffle_seed: int | None) -> tuple[np.ndarray, dict[str, object]]:
    """The stores' row order: list positions of train, then val, then test rows, each split in a
    random order drawn from ``shuffle_seed`` (None: list order), and its record for provenance
    ({"shuffle_seed", "permutation_sha256"}: the hash of the positions as little-endian int64).

    Shuffling here, once, is what makes every shard and every streamed batch a mix of classes:
    the streams shuffle a few shards at a time, so rows kept in a class-sorted list's order
    would give batches of a handful of classes (SALF-CBM's batch-wide cos^3 loss and SAGA's
    minibatches assume a random sample)."""
    order = np.argsort(pd.Categorical(splits, categories=list(SPLITS)).codes, kind="stable")
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        order = np.concatenate([rng.permutation(order[splits[order] == split]) for split in SPLITS])
    digest = hashlib.sha256(order.astype("<i8").tobytes()).hexdigest()
    return order, {"shuffle_seed": shuffle_seed, "permutation_sha256": digest}


def list_images(params: ImageFolderParams, seed: int) -> ImageList:
    """Collect candidates, assign splits, and order them train, val, test (contiguous reads), each
    split shuffled by ``params.shuffle_seed`` (store_order).

    Every class needs a train image (UserError otherwise): its weights are learnt from them."""
    if params.root is not None:
        key, value = "data.imagefolder.root", params.root
        paths, names, classes = scan_tree(Path(params.root), params.extensions)
        frame = pd.DataFrame({"path": paths, "label": names})
    else:
        key, value = LIST_KEY, params.list_file
        frame = read_list_file(Path(params.list_file))
        classes = sorted(frame["label"].astype(str).unique())
        if len(classes) < 2:
            raise UserError(f"lists {len(classes)} class ({', '.join(classes) or 'none'}); a classifier needs at least 2",
                            key=key, value=value, fix="list images of two classes or more in its label column")
    labels = frame["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    if "split" in frame.columns:
        splits = frame["split"].astype(str).to_numpy(object)
    else:
        splits = assign_splits(labels, params.val_fraction, params.test_fraction, seed)
    trained = set(labels[splits == "train"].tolist())
    untrained = [name for i, name in enumerate(classes) if i not in trained]
    if untrained:
        raise UserError(f"classes without a train image: {', '.join(untrained)}", key=key, value=value,
                        fix="add images of them (or lower data.imagefolder.val_fraction and test_fraction, or give them train rows)")
    order, record = store_order(splits, params.shuffle_seed)
    return ImageList([frame["path"].iloc[i] for i in order], labels[order], splits[order], classes, record)


def load_rgb(path: str, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, exif_transpose: bool = True) -> np.ndarray:
    """Decode to RGB (`decode_rgb`: any mode, alpha over white, EXIF orientation applied), resize
    the shorter side to ``size`` and centre-crop: uint8 (size, size, 3). Raises BadImageError."""
    rgb = decode_rgb(path, max_pixels=max_pixels, exif_transpose=exif_transpose)
    fitted = ImageOps.fit(Image.fromarray(rgb), (size, size), Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8)


class DecodeDataset(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers: (uint8 (size, size, 3), None), or for a bad file
    (zeros, its BadImageError)."""

    def __init__(self, paths: list[str], size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.paths = paths
        self.size = size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, BadImageError | None]:
        try:
            return load_rgb(self.paths[i], self.size, max_pixels=self.max_pixels), None
        except BadImageError as exc:
            return np.zeros((self.size, self.size, 3), np.uint8), exc


def bad_image_error(error: BadImageError, section: str, max_pixels: int | None) -> UserError:
    """A bad file under on_bad_image: error, as the UserError naming the param to change (`section`
    is "data.imagefolder" or "data.segfolder"): max_pixels for a too-large image, else on_bad_image."""
    skip = f"{section}.on_bad_image: skip leaves it out"
    if isinstance(error, ImageTooLargeError):
        fix = f"in params.yaml, null means no limit; {skip}"
        return UserError(str(error), key=f"{section}.max_pixels", value=max_pixels, fix=fix)
    return UserError(str(error), key=f"{section}.on_bad_image", value="error", fix=f"replace or remove the file; {skip}")
