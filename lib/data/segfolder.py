"""Real images with segmentation masks (data.kind "segfolder"), for the evaluate stage.

Layout (ImageNet-S-style; Broden-style concept vocabularies via concepts.csv)::

    root/images/<class>/<stem>.<ext>     the images, one folder per class
    root/masks/<class>/<stem>.png        one mask per image, same size as the image
    root/concepts.csv                    optional: value,name,type

A mask PNG holds one integer per pixel: the grey level of an "L"/"P"/"I" image, or R + 256·G of
an RGB(A) image (the encoding of ImageNet-S and Broden, which have over 255 labels).
- Without concepts.csv the masks are binary: every nonzero pixel is the object of the image's
  class. The concepts are then the classes (type "object") and class c's rule is concept c.
- With concepts.csv, pixel value `value` is concept `name` of type `type`; values it does not
  list (0, ImageNet-S's 1000 "other") are unlabelled. A class whose name is a concept name has
  that concept as its rule (its segmentation target); other classes have none.

Masks are resized and centre-cropped like the images (nearest neighbour) and stored one-hot in
masks.zarr, masks (N, K, S, S) uint8, as for the toy world; dataset.json lists the concepts and
rules in the same form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lib.core.errors import UserError
from lib.core.params import SegFolderParams
from lib.data.decode import DEFAULT_MAX_PIXELS
from lib.data.imagefolder import BadImageError, assign_splits, load_rgb, scan_tree, store_order

CONCEPTS_FILE = "concepts.csv"
MASK_SUFFIX = ".png"
BINARY_TYPE = "object"  # concept type of the classes when masks are binary
UNLABELLED = -1


@dataclass(frozen=True)
class Vocabulary:
    """Concepts of a segfolder dataset and how mask values map to them."""

    concepts: list[dict[str, str]]  # [{"name", "type"}], in masks.zarr channel order
    lookup: np.ndarray | None  # int64: pixel value -> concept id (UNLABELLED); None = binary masks
    rules: list[dict[str, Any]]  # dataset.json rule rows (class_id, class_name, concept_id, concept, concept_type)


@dataclass(frozen=True)
class PairList:
    """Image/mask pairs in store order (train, val, test) with labels and splits."""

    images: list[str]
    masks: list[str]
    labels: np.ndarray
    splits: np.ndarray
    class_names: list[str]
    row_order: dict[str, object]  # how the rows were ordered (imagefolder.store_order), for provenance


def read_vocabulary(root: Path, class_names: list[str]) -> Vocabulary:
    """The concept vocabulary: root/concepts.csv if present, else the classes (binary masks)."""
    path = root / CONCEPTS_FILE
    if not path.exists():
        concepts = [{"name": c, "type": BINARY_TYPE} for c in class_names]
        rules = [_rule(c, name, c, BINARY_TYPE) for c, name in enumerate(class_names)]
        return Vocabulary(concepts, None, rules)
    table = pd.read_csv(path)
    missing = {"value", "name", "type"} - set(table.columns)
    fix = f"make {CONCEPTS_FILE} a CSV value,name,type: one row per mask value (README 'Segmentation data')"
    if missing:
        raise UserError(f"{path} lacks columns {sorted(missing)}", key="data.segfolder.root", value=str(root), fix=fix)
    values = pd.to_numeric(table["value"], errors="coerce")
    if values.isna().any() or (values < 0).any() or values.duplicated().any() or table["name"].duplicated().any():
        raise UserError(f"{path}: values must be distinct non-negative integers and names distinct", key="data.segfolder.root",
                        value=str(root), fix=fix)
    lookup = np.full(int(values.max()) + 1, UNLABELLED, dtype=np.int64)
    lookup[values.to_numpy(np.int64)] = np.arange(len(table))
    concepts = [{"name": str(n), "type": str(t)} for n, t in zip(table["name"], table["type"], strict=True)]
    ids = {c["name"]: k for k, c in enumerate(concepts)}
    rules = [_rule(c, name, ids[name], concepts[ids[name]]["type"]) for c, name in enumerate(class_names) if name in ids]
    return Vocabulary(concepts, lookup, rules)


def _rule(class_id: int, class_name: str, concept_id: int, concept_type: str) -> dict[str, Any]:
    return {"class_id": class_id, "class_name": class_name, "concept_id": concept_id, "concept": class_name, "concept_type": concept_type}


def list_pairs(params: SegFolderParams, seed: int) -> PairList:
    """Images under root/images with their mask paths, seeded stratified splits, train first, each
    split shuffled by ``params.shuffle_seed`` (imagefolder.store_order)."""
    root = Path(params.root)
    paths, names, classes = scan_tree(root / "images", params.extensions, key="data.segfolder.root")
    images_dir = root / "images"
    masks = [str((root / "masks" / Path(p).relative_to(images_dir)).with_suffix(MASK_SUFFIX)) for p in paths]
    labels = np.array([classes.index(n) for n in names], dtype=np.int64)
    splits = assign_splits(labels, 0.0, params.test_fraction, seed)
    order, record = store_order(splits, params.shuffle_seed)
    return PairList([paths[i] for i in order], [masks[i] for i in order], labels[order], splits[order], classes, record)


def mask_values(path: str) -> np.ndarray:
    """The integer label of every pixel of a mask PNG, int64 (H, W) (R + 256·G for RGB masks)."""
    file = Path(path)
    if not file.exists():
        raise BadImageError(f"{path}: mask not found")
    try:
        with Image.open(file) as mask:
            mask.load()
            array = np.asarray(mask)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadImageError(f"{path}: cannot decode mask ({exc})") from None
    if array.ndim == 3:
        return array[..., 0].astype(np.int64) + 256 * array[..., 1].astype(np.int64)
    return array.astype(np.int64)


def concept_map(values: np.ndarray, label: int, vocabulary: Vocabulary) -> np.ndarray:
    """Concept id of each pixel, int64 (H, W) (UNLABELLED where none), from mask values."""
    if vocabulary.lookup is None:
        return np.where(values > 0, label, UNLABELLED)
    lookup = vocabulary.lookup
    return np.where(values < len(lookup), lookup[np.minimum(values, len(lookup) - 1)], UNLABELLED)


def fit_like_image(ids: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to `size` and centre-crop, as `load_rgb` does, with nearest neighbour."""
    fitted = ImageOps.fit(Image.fromarray(ids.astype(np.int32)), (size, size), Image.Resampling.NEAREST)
    return np.asarray(fitted, dtype=np.int64)


def load_pair(
    image: str, mask: str, label: int, vocabulary: Vocabulary, size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image (size, size, 3), int16 concept map (size, size)); BadImageError names the file."""
    values = mask_values(mask)
    # masks are matched to the stored pixel grid (the size check below is on the raw header size),
    # so the image must not be turned upright by its EXIF orientation while its mask is not
    rgb = load_rgb(image, size, max_pixels=max_pixels, exif_transpose=False)
    with Image.open(image) as header:  # the size only; load_rgb has decoded the pixels
        width, height = header.size
    if values.shape != (height, width):
        raise BadImageError(f"{mask}: mask is {values.shape[1]}x{values.shape[0]} but its image is {width}x{height}")
    return rgb, fit_like_image(concept_map(values, label, vocabulary), size).astype(np.int16)


class PairDataset(torch.utils.data.Dataset):
    """Decodes image/mask pairs in DataLoader workers: (image, concept map, None), or for a bad pair
    (zeros, UNLABELLED, its BadImageError)."""

    def __init__(
        self, pairs: PairList, rows: range, vocabulary: Vocabulary, size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> None:
        self.pairs, self.rows, self.vocabulary, self.size, self.max_pixels = pairs, rows, vocabulary, size, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, BadImageError | None]:
        row = self.rows[i]
        pairs = self.pairs
        try:
            image, ids = load_pair(pairs.images[row], pairs.masks[row], int(pairs.labels[row]), self.vocabulary, self.size, self.max_pixels)
            return image, ids, None
        except BadImageError as exc:
            blank = np.full((self.size, self.size), UNLABELLED, np.int16)
            return np.zeros((self.size, self.size, 3), np.uint8), blank, exc


def one_hot(concept_maps: np.ndarray, n_concepts: int) -> np.ndarray:
    """Concept maps int (B, S, S) (UNLABELLED = none) -> one-hot masks uint8 (B, K, S, S)."""
    ids = np.arange(n_concepts, dtype=concept_maps.dtype)
    return (concept_maps[:, None] == ids[None, :, None, None]).astype(np.uint8)
