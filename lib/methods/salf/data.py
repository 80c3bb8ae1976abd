"""SALF-CBM stage inputs: the splits, the similarity target P and batch streams over the stores.

Every stream is a re-iterable source built on :func:`lib.core.streams.batch_source` (shard-grouped
reads, shuffled by shard for training), so memory is bounded by the batch size and the shard
buffer, never by the number of images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import zarr
from torch import Tensor

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.schema import CIRCLES, IMAGE_SIZE_KEY, PREPROCESS_KEY, P, check_compatible, check_same_images
from lib.core.stores import open_store
from lib.core.streams import batch_source
from lib.data.manifest import read_manifest, split_indices
from lib.kernels.preprocess import Preprocess
from lib.kernels.registration import Registration
from lib.kernels.similarity import similarity_batch
from lib.methods.salf.cbl import BatchSource
from lib.methods.salf.glm import Source
from lib.methods.salf.pooling import Standardiser
from lib.pipeline.stored_concepts import Concepts

__all__ = [
    "SimilarityTarget", "Splits", "glm_batches", "held_pair_bytes", "pair_batches", "registration_of", "salf_splits", "similarity_target",
    "splits_of",
]


@dataclass(frozen=True)
class Splits:
    """Sorted store rows of the three splits SALF-CBM uses."""

    train: np.ndarray
    val: np.ndarray  # early stopping, the cos^3 filter and lambda selection
    test: np.ndarray  # final metrics only
    val_from_train: bool  # True when the manifest has no val split and val was carved from train


def salf_splits(manifest: pd.DataFrame, val_fraction: float, seed: int) -> Splits:
    """The manifest's train/val/test rows; without a val split (e.g. segfolder data) a seeded
    `val_fraction` of train becomes val, so no decision ever looks at the test split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val, test = (split_indices(manifest, split) for split in ("train", "val", "test"))
    carved = len(val) == 0
    if carved:
        n_val = round(val_fraction * len(train))
        if not 1 <= n_val < len(train):
            raise UserError(
                f"the manifest has no val split and this share of {len(train)} train images leaves no val or no train images",
                key="cbl.val_fraction", value=val_fraction, fix="change it, or give the data a val split (data.<kind>.val_fraction)",
            )
        chosen = np.random.default_rng(seed).choice(len(train), size=n_val, replace=False)
        is_val = np.zeros(len(train), dtype=bool)
        is_val[chosen] = True
        train, val = train[~is_val], train[is_val]
    for name, rows in (("train", train), ("val", val), ("test", test)):
        if len(rows) == 0:
            raise UserError(
                f"the manifest's {name} split is empty; SALF-CBM needs train, val and test images",
                fix="give every split images (data.<kind>.val_fraction and test_fraction, or the list's split column) and re-run prepare",
            )
    return Splits(train, val, test, carved)


def splits_of(config: Params, layout: Layout) -> Splits:
    """The splits every SALF-CBM stage uses: :func:`salf_splits` with cbl.val_fraction and cbl.seed."""
    return salf_splits(read_manifest(layout.manifest), config.cbl.val_fraction, config.cbl.seed)


@dataclass(frozen=True)
class SimilarityTarget:
    """Where the bottleneck's target P (B, M, G, G) comes from, one batch at a time.

    `array` is the similarity store's P (N, M, G, G) (materialised, `text_emb` None), the circles
    store's embeddings (N, G, G, D), or plain-image embeddings (N, D) (LF-CBM's global target:
    G = 1); with the latter two, P is one matmul per batch with the concepts' text embeddings (M, D).
    """

    array: zarr.Array
    text_emb: Tensor | None = None

    def __post_init__(self) -> None:
        if self.text_emb is None and self.array.ndim != 4:
            raise ValueError(f"a stored P must be 4-D (N, M, G, G), got shape {self.array.shape}")
        if self.text_emb is not None:
            if self.array.ndim not in (2, 4):
                raise ValueError(f"embeddings must be (N, G, G, D) or (N, D), got shape {self.array.shape}")
            if self.text_emb.ndim != 2 or self.text_emb.shape[1] != self.array.shape[-1]:
                raise ValueError(
                    f"text_emb must have shape (M, {self.array.shape[-1]}) to match the image embeddings, "
                    f"got {tuple(self.text_emb.shape)}"
                )

    @property
    def n_concepts(self) -> int:
        return self.array.shape[1] if self.text_emb is None else self.text_emb.shape[0]

    @property
    def grid(self) -> int:
        return 1 if self.array.ndim == 2 else self.array.shape[2]

    def __call__(self, block: Tensor) -> Tensor:
        """P (B, M, G, G) float32 of one block of `array` rows (on the block's device)."""
        if self.text_emb is None:
            return block.to(torch.float32)
        text = self.text_emb.to(block.device)
        if block.ndim == 2:  # one cell: the image's global similarity
            return similarity_batch(block[:, None, None], text)
        return similarity_batch(block, text)


def similarity_target(layout: Layout, concepts: Concepts) -> SimilarityTarget:
    """P from the similarity store when it holds it (similarity.materialize), else from the
    circle embeddings and the concepts' text embeddings; checked against the concept list."""
    stored = open_store(layout.similarity)
    if P in stored:
        check_same_images(layout.images, {"similarity": stored.attrs})
        target = SimilarityTarget(stored[P])
    else:
        circles = open_store(layout.circles)
        check_compatible(circles.attrs, concepts.attrs)
        target = SimilarityTarget(circles[CIRCLES], concepts.text_emb)
    if target.n_concepts != len(concepts.names):
        raise ValueError(
            f"{layout.similarity} has {target.n_concepts} concepts but {layout.concepts} lists {len(concepts.names)}; "
            "rerun the similarity stage"
        )
    return target


def registration_of(layout: Layout, layer: str) -> Registration:
    """The geometry of the grid (lib.kernels.registration) from the stores' records: the stored
    images' size and CLIP's preprocessing (circles store), the backbone's (the layer's features store).
    Both stores must come from the current images: cbl pairs their rows."""
    circles = open_store(layout.circles).attrs
    features = open_store(layout.features(layer)).attrs
    for name, attrs in (("circles", circles), ("features", features)):
        if PREPROCESS_KEY not in attrs or IMAGE_SIZE_KEY not in attrs:
            raise UserError(
                f"the {name} store does not record the preprocessing it was made with", fix=f"re-run the {name} stage"
            )
    check_same_images(layout.images, {"circles": circles, "features": features})
    if list(circles[IMAGE_SIZE_KEY]) != list(features[IMAGE_SIZE_KEY]):
        raise UserError(
            f"circles ({circles[IMAGE_SIZE_KEY]}) and features ({features[IMAGE_SIZE_KEY]}) were made from images of "
            "different sizes", fix="re-run both on the current images (dvc repro)",
        )
    return Registration(
        image_size=tuple(circles[IMAGE_SIZE_KEY]),
        grid=int(circles["grid"]),
        prompt=Preprocess.from_dict(circles[PREPROCESS_KEY]),
        backbone=Preprocess.from_dict(features[PREPROCESS_KEY]),
    )


def pair_batches(
    features: zarr.Array,
    target: SimilarityTarget,
    rows: np.ndarray,
    batch_size: int,
    sample: Callable[[Tensor], Tensor],
    *,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    in_memory_mb: float = 0.0,
) -> BatchSource:
    """(sampled features (B, C, G, G) fp32, P (B, M, G, G) fp32) batches of store `rows` on `device`;
    `sample` maps a block of `features` to the grid cells (ConceptBottleneck.sample).

    When the split's sampled features plus P fit in `in_memory_mb`, they are read and sampled once
    and held on the device; otherwise every pass streams from the stores, shuffled by shard.
    With `shuffle` (training) a pass drops its final partial batch whenever a full one exists:
    the cubic cosine loss centres across the batch, and a remainder of a few images would give a
    noisy, badly scaled step.
    """
    if features.shape[0] != target.array.shape[0]:
        raise ValueError(
            f"features has {features.shape[0]} rows but the similarity store {target.array.shape[0]}; "
            "both must cover the same images"
        )
    smallest = min(batch_size, len(rows)) if shuffle else 1
    if held_pair_bytes(len(rows), features.shape[1], target.n_concepts, target.grid, in_memory_mb):
        return _cached_pairs(features, target, rows, batch_size, sample, smallest, shuffle=shuffle, seed=seed, device=device)
    source = batch_source(
        {"features": features, "target": target.array}, rows, batch_size, shuffle=shuffle, seed=seed, device=device
    )

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for block in source():
            if block["features"].shape[0] >= smallest:
                yield sample(block["features"]), target(block["target"])

    return batches


def held_pair_bytes(n_rows: int, channels: int, n_concepts: int, grid: int, in_memory_mb: float) -> int:
    """Bytes :func:`pair_batches` holds on the device for `n_rows` rows: the sampled features and P
    (fp32) when they fit in `in_memory_mb`, else 0 (they stream)."""
    cached = n_rows * (channels + n_concepts) * grid**2 * 4
    return cached if cached <= in_memory_mb * 2**20 else 0


def _cached_pairs(
    features: zarr.Array,
    target: SimilarityTarget,
    rows: np.ndarray,
    batch_size: int,
    sample: Callable[[Tensor], Tensor],
    smallest: int,
    *,
    shuffle: bool,
    seed: int,
    device: torch.device | str,
) -> BatchSource:
    """The in-memory branch of :func:`pair_batches`: one read, then seeded reshuffles on the device."""
    blocks = batch_source({"features": features, "target": target.array}, rows, batch_size, device=device)()
    parts = [(sample(b["features"]), target(b["target"])) for b in blocks]
    x, p = torch.cat([f for f, _ in parts]), torch.cat([t for _, t in parts])
    generator = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
        for idx in order.to(x.device).split(batch_size):
            if len(idx) >= smallest:
                yield x[idx], p[idx]

    return batches


def glm_batches(
    activations: zarr.Array,
    labels: zarr.Array,
    rows: np.ndarray,
    standardiser: Standardiser,
    batch_size: int,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Source:
    """(standardised c* (B, M), labels (B,) int64, position (B,)) batches for lib.methods.salf.glm;
    `transform` maps a block of `activations` to c* first (default: they are c*).

    position is each row's place in the sorted `rows`: the index of its SAGA table entry.
    """
    sorted_rows = torch.as_tensor(np.sort(rows), device=device)
    standardiser = standardiser.to(device)
    source = batch_source(
        {"activations": activations, "labels": labels}, rows, batch_size, shuffle=shuffle, seed=seed, device=device
    )

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for block in source():
            position = torch.searchsorted(sorted_rows, block["index"].to(sorted_rows.dtype))
            values = block["activations"] if transform is None else transform(block["activations"])
            yield standardiser(values), block["labels"].long(), position

    return batches
