"""C²-Score (FaCT §4) by the authors' definition (their fact/analysis/dino_consistency.py), for any
concept method's input-level maps.

Per concept j, over the N evaluated images:
- images: those with presence P_j > 0 ("present"); if there are at most `min_images` (10) of them,
  all; else those above min(the (1 - top_fraction) quantile of the present presences, the
  (min_images + 1)-th largest), i.e. the top max(5 % of the present images, 10) by presence
  (`select_concept_images`). A concept with fewer than `min_count` (2) images is not scored.
- each image's input map A = clip(map, 0) is encoded as e = sum A F / sum A, F the featurizer's dense
  features upsampled bilinearly to the map's size, centred by their mean over the N images and all
  pixels (`encode_attribution`, `pooling_matrix`).
- C²_j = presence-weighted mean pairwise cosine of the encodings (`weighted_mean_pairwise_cosine`).
- c2 = mean of C²_j over the concepts with at least `mean_min_images` (5) images; c2_random = the same
  score of ONE pooled random "concept" that has every evaluated image, its map uniform noise floored
  at a random level (rand(H, W).clip(rand())), weighted by the map's mass; the headline is
  c2_delta = c2 - c2_random (the paper's Δ_rand).
- spatial extent of a concept: mean over its images of the number of pixels holding 80 % of A's mass.

Departure: a map with no positive mass has no encoding (the authors' code divides 0 by 0 and the
concept's score becomes NaN); here it gets weight 0, and a concept is NaN only when fewer than two of
its images carry weight.

Closed form. For unit vectors e_i and weights w_i summing to 1,
    sum_{i != j} w_i w_j e_i . e_j = ||sum_i w_i e_i||^2 - sum_i w_i^2,
    sum_{i != j} w_i w_j           = 1 - sum_i w_i^2,
so the weighted mean over pairs costs O(N D) per concept, with no N x N matrix.

`c2_scores` takes the maps and features as functions of store rows (streamed, any size);
`c2_from_tensors` is the same for presence (N, M), maps (N, M, H, W) and features (N, D, h, w) in
memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor

__all__ = [
    "C2Result",
    "authors_random_map",
    "ConceptImages",
    "SelectedImages",
    "TopImages",
    "c2_from_tensors",
    "c2_scores",
    "encode_attribution",
    "extent_pixels",
    "pooling_matrix",
    "select_concept_images",
    "selection_depth",
    "weighted_mean_pairwise_cosine",
]

_EPS = 1e-12

MapFn = Callable[[Tensor, Tensor], Tensor]  # (rows (B,), concepts (B,)) -> maps (B, H, W) of concept b in image b
FeatureFn = Callable[[Tensor], Tensor]  # rows (B,) -> dense features (B, D, h, w)


class SelectedImages(NamedTuple):
    """Per concept j: `index` (J, m) image indices, highest presence first; `presence` (J, m) theirs."""

    index: Tensor
    presence: Tensor


@dataclass(frozen=True)
class ConceptImages:
    """The images one concept is scored on: store rows (n,) and their presences (n,), highest first."""

    concept: int
    rows: Tensor
    presence: Tensor


@dataclass(frozen=True)
class C2Result:
    """`table`: one row per scored concept (concept, images, c2, extent_pixels, extent_fraction,
    averaged: whether it counts in the mean); `c2` the mean over the averaged concepts (NaN if none),
    `c2_random` the pooled random baseline, `c2_delta` = c2 - c2_random."""

    table: pd.DataFrame
    c2: float
    c2_random: float

    @classmethod
    def skipped(cls) -> C2Result:
        """No concept scored (the featurizer's data are missing): an empty table, NaN scores."""
        columns = ["concept", "images", "c2", "extent_pixels", "extent_fraction", "averaged"]
        return cls(pd.DataFrame({name: pd.Series(dtype=bool if name == "averaged" else float) for name in columns}), np.nan, np.nan)

    @property
    def c2_delta(self) -> float:
        return self.c2 - self.c2_random

    def histogram(self, bins: int = 50) -> pd.DataFrame:
        """The authors' figure as plot data: % of the averaged concepts per C² bin over [-1, 1]
        (kind "concepts", c2 = the bin's centre), then one row each for the mean (kind "c2") and the
        random baseline (kind "c2_random"), whose `label` gives Δ_rand."""
        values = self.table.loc[self.table["averaged"], "c2"].to_numpy()
        counts, edges = np.histogram(values, bins=bins, range=(-1, 1))
        percent = 100 * counts / max(counts.sum(), 1)
        delta = f"Δ_rand = {self.c2_delta:.3f}"
        frame = pd.DataFrame({"c2": (edges[:-1] + edges[1:]) / 2, "percent": percent, "kind": "concepts", "label": ""})
        marks = pd.DataFrame({"c2": [self.c2, self.c2_random], "percent": [0.0, 0.0], "kind": ["c2", "c2_random"],
                              "label": [f"mean {self.c2:.3f} ({delta})", f"random {self.c2_random:.3f} ({delta})"]})
        return pd.concat([frame, marks], ignore_index=True)

    @property
    def n_scored(self) -> int:
        return int(np.isfinite(self.table["c2"]).sum())

    @property
    def n_averaged(self) -> int:
        return int(self.table["averaged"].sum())


def weighted_mean_pairwise_cosine(e: Tensor, w: Tensor) -> Tensor:
    """Weighted mean of cos(e_i, e_j) over ordered pairs i != j, pair weight w_i w_j.

    e (..., N, D), w (..., N) non-negative; leading dims are batched (e.g. one row per concept).
    Rows of e that are zero or non-finite (an attribution with no mass) get weight 0, so padding
    with zero rows is allowed. Returns (...); NaN where fewer than two rows carry weight."""
    if e.shape[:-1] != w.shape:
        raise ValueError(f"e (..., N, D) and w (..., N) disagree: {tuple(e.shape)}, {tuple(w.shape)}")
    if bool((w < 0).any()):
        raise ValueError("weights must be >= 0")
    out_dtype = torch.promote_types(e.dtype, torch.float32)
    # float64 inside: 1 - sum w^2 cancels badly when one image carries most of the weight.
    e, w = e.to(torch.float64), w.to(torch.float64)
    norm = e.norm(dim=-1)
    valid = torch.isfinite(norm) & (norm > _EPS)
    unit = torch.where(valid[..., None], e / norm.clamp_min(_EPS)[..., None], torch.zeros_like(e))
    w = torch.where(valid, w, torch.zeros_like(w))
    w = w / w.sum(dim=-1, keepdim=True)  # rows with no weight become NaN, as documented
    sum_sq = w.square().sum(dim=-1)
    mean_vec = (w[..., None] * unit).sum(dim=-2)
    pair_weight = 1.0 - sum_sq
    score = (mean_vec.square().sum(dim=-1) - sum_sq) / pair_weight
    nan = torch.full_like(score, math.nan)
    return torch.where(pair_weight > 1e-12, score, nan).to(out_dtype)


def encode_attribution(attribution: Tensor, feats: Tensor) -> Tensor:
    """e_n = sum_hw A_n F_n / sum_hw A_n: attribution maps A (N, H, W) (clipped at 0 here) and dense
    features F (N, D, H, W) already upsampled to the maps' size -> (N, D). An all-zero map gives a zero
    row, which `weighted_mean_pairwise_cosine` ignores."""
    if attribution.ndim != 3 or feats.ndim != 4 or feats.shape[0] != attribution.shape[0] \
            or feats.shape[2:] != attribution.shape[1:]:
        raise ValueError(
            f"need A (N, H, W) and F (N, D, H, W) of one size, got {tuple(attribution.shape)}, {tuple(feats.shape)}"
        )
    a = attribution.clamp_min(0).to(feats.dtype)
    mass = a.sum(dim=(1, 2))
    weighted = torch.einsum("nhw,ndhw->nd", a, feats)
    return torch.where(mass[:, None] > 0, weighted / mass.clamp_min(_EPS)[:, None], torch.zeros_like(weighted))


def pooling_matrix(
    grid: tuple[int, int], size: tuple[int, int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """U (H*W, h*w): column c is grid cell c's one-hot map upsampled bilinearly to `size` (H, W), so
    sum_pixels A * upsample(F) = (A_flat @ U) . F_cells for any map A and features F on the grid."""
    h, w = grid
    basis = torch.eye(h * w, device=device, dtype=dtype).reshape(h * w, 1, h, w)
    return F.interpolate(basis, size=size, mode="bilinear", align_corners=False).reshape(h * w, -1).T.contiguous()


def extent_pixels(maps: Tensor, mass: float = 0.8) -> Tensor:
    """Per map (B, H, W): the fewest pixels holding `mass` of its positive part (the authors'
    n_pixels), float64 (B,); NaN for a map with no positive mass."""
    values = maps.flatten(1).clamp_min(0).double().sort(dim=1, descending=True).values
    cumulative = values.cumsum(dim=1)
    total = cumulative[:, -1:]
    count = (cumulative >= mass * total).double().argmax(dim=1) + 1
    return torch.where(total[:, 0] > 0, count.double(), torch.full_like(count.double(), math.nan))


class TopImages:
    """The top m images per concept by presence over a stream of batches, and how many images each
    concept is present in (P > 0): what `select_concept_images` needs, never N x J in memory."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.values: Tensor | None = None
        self.index: Tensor | None = None
        self.n_positive: Tensor | None = None

    def add(self, presence: Tensor, rows: Tensor) -> None:
        """presence (B, J) of the images with store rows `rows` (B,)."""
        positive = (presence > 0).sum(dim=0).cpu()
        self.n_positive = positive if self.n_positive is None else self.n_positive + positive
        self._fold(presence, rows.to(presence.device)[:, None].expand_as(presence))

    def _fold(self, values: Tensor, index: Tensor) -> None:
        if self.values is not None:
            values = torch.cat([self.values, values.to(self.values.device)])
            index = torch.cat([self.index, index.to(self.index.device)])
        self.values, top = values.topk(min(self.m, values.shape[0]), dim=0)
        self.index = index.gather(0, top)

    def cpu(self) -> TopImages:
        """A copy on the CPU (to send to another torchrun rank)."""
        copy = TopImages(self.m)
        if self.values is not None:
            copy.values, copy.index, copy.n_positive = self.values.cpu(), self.index.cpu(), self.n_positive.clone()
        return copy

    def merge(self, other: TopImages) -> None:
        """Fold in the top images of another stream over other images (another torchrun rank's)."""
        if other.values is None:
            return
        self.n_positive = other.n_positive.clone() if self.n_positive is None else self.n_positive + other.n_positive
        self._fold(other.values, other.index)

    def result(self) -> SelectedImages:
        """index (J, m) store rows, highest presence first; presence (J, m)."""
        if self.values is None:
            raise ValueError("no images added")
        return SelectedImages(index=self.index.T.contiguous(), presence=self.values.T.contiguous())


def selection_depth(n: int, top_fraction: float = 0.05, min_images: int = 10) -> int:
    """How many top images per concept a TopImages over n images must keep for
    `select_concept_images` to be exact: the (1 - top_fraction) quantile of up to n present
    presences and the (min_images + 1)-th largest both lie in the top max(ceil(f n) + 2, min_images + 1)."""
    if not 0 < top_fraction < 1 or min_images < 1:
        raise ValueError(f"need 0 < top_fraction < 1 and min_images >= 1, got {top_fraction}, {min_images}")
    return min(n, max(math.ceil(top_fraction * n) + 2, min_images + 1))


def select_concept_images(
    top: SelectedImages, n_positive: Tensor, top_fraction: float = 0.05, min_images: int = 10, min_count: int = 2
) -> list[ConceptImages]:
    """The images each concept is scored on (module doc; the authors' get_indices_to_explain), from
    its top presences (highest first, `selection_depth` deep) and its count of present images. Concepts
    with fewer than `min_count` images are left out."""
    chosen = []
    depth = top.presence.shape[1]
    for j in range(top.presence.shape[0]):
        n = int(n_positive[j])
        if n == 0:  # dead
            continue
        values = top.presence[j].double()
        if n <= min_images:
            threshold = 0.0
        else:
            # torch.quantile's linear interpolation over the n present values, read from the top:
            # ascending position i is descending position n - 1 - i.
            position = (1.0 - top_fraction) * (n - 1)
            lo, hi = math.floor(position), math.ceil(position)
            if n - 1 - lo >= depth or min_images >= depth:
                raise ValueError(f"concept {j}: {depth} top images are too few for {n} present ones (selection_depth)")
            low, high = float(values[n - 1 - lo]), float(values[n - 1 - hi])
            threshold = min(low + (position - lo) * (high - low), float(values[min_images]))
        keep = values > threshold
        if int(keep.sum()) >= min_count:
            chosen.append(ConceptImages(j, top.index[j][keep], top.presence[j][keep]))
    return chosen


def authors_random_map(size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """One image's random map, as the authors draw it: rand(H, W).clip(rand()) (float64)."""
    noise = torch.rand(size, generator=generator, dtype=torch.float64)
    return noise.clamp_min(float(torch.rand(1, generator=generator, dtype=torch.float64)))


def _encode(maps: Tensor, feats: Tensor, pool: Tensor | None) -> Tensor:
    """sum A F / sum A per map (B, H, W) with features (B, D, h, w) on their grid (`pool`: the
    adjoint of upsampling them to the maps' size; None when they already have it)."""
    if pool is None:
        return encode_attribution(maps, feats)
    pooled = (maps.flatten(1).to(pool.dtype) @ pool).reshape(maps.shape[0], *feats.shape[2:])
    return encode_attribution(pooled, feats)


def _pixel_mean(feats: Tensor, pool: Tensor | None) -> Tensor:
    """Mean over pixels of the features upsampled to the maps' size, (B, D)."""
    if pool is None:
        return feats.mean(dim=(2, 3))
    return feats.flatten(2) @ pool.mean(dim=0).to(feats.dtype)


def c2_scores(
    selection: list[ConceptImages],
    rows: Tensor,
    maps: MapFn,
    features: FeatureFn,
    size: tuple[int, int],
    *,
    mean_min_images: int = 5,
    extent_mass: float = 0.8,
    seed: int = 0,
    batch_size: int = 64,
    progress: Progress | None = None,
    random_map: Callable[[tuple[int, int], torch.Generator], Tensor] = authors_random_map,
) -> C2Result:
    """The C²-Score (module doc) of the concepts in `selection` over the evaluated images `rows` (N,):
    maps(rows, concepts) gives the input maps (B, H=size[0], W=size[1]), features(rows) the dense
    features (B, D, h, w) on any grid. Two passes: every image once (dataset mean, random baseline),
    then every (concept, image) pair, in batches of `batch_size`, ordered by image. The random maps are
    drawn image by image in `rows` order from a generator seeded with `seed` (`random_map`)."""
    rows = rows.cpu().long()
    generator = torch.Generator().manual_seed(seed)
    pool: Tensor | None = None
    pool_ready = False
    total: Tensor | None = None
    random_enc, random_mass = [], []
    task = progress.add_task("C²-Score", total=len(rows) + sum(len(c.rows) for c in selection)) if progress else None
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        feats = features(chunk).double()
        if not pool_ready:
            grid = tuple(feats.shape[2:])
            pool = None if grid == tuple(size) else pooling_matrix(grid, size, feats.device, torch.float64)
            pool_ready = True
        noise = torch.stack([random_map(tuple(size), generator) for _ in range(len(chunk))]).to(feats.device)
        part = _pixel_mean(feats, pool).sum(dim=0)
        total = part if total is None else total + part
        random_enc.append(_encode(noise, feats, pool))
        random_mass.append(noise.sum(dim=(1, 2)))
        if task is not None:
            progress.advance(task, len(chunk))
    if total is None:
        raise ValueError("no images to evaluate")
    mean = total / len(rows)
    c2_random = float(weighted_mean_pairwise_cosine(torch.cat(random_enc) - mean, torch.cat(random_mass)))

    # Every (concept, image) pair, ordered by image so that each batch needs few images' features.
    owner = torch.cat([torch.full((len(c.rows),), i) for i, c in enumerate(selection)]) if selection else torch.zeros(0, dtype=torch.long)
    pair_rows = torch.cat([c.rows.cpu().long() for c in selection]) if selection else torch.zeros(0, dtype=torch.long)
    pair_concepts = torch.tensor([c.concept for c in selection], dtype=torch.long)[owner]
    order = torch.argsort(pair_rows, stable=True)
    encodings = torch.zeros(len(order), mean.shape[0], dtype=torch.float64)
    valid = torch.zeros(len(order), dtype=torch.bool)
    extents = torch.zeros(len(order), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        pick = order[start : start + batch_size]
        unique, inverse = torch.unique(pair_rows[pick], return_inverse=True)
        feats = features(unique).double()[inverse.to(mean.device)]
        attribution = maps(pair_rows[pick], pair_concepts[pick]).double().clamp_min(0)
        encodings[pick] = (_encode(attribution, feats, pool) - mean).cpu()
        valid[pick] = (attribution.flatten(1).sum(dim=1) > 0).cpu()
        extents[pick] = extent_pixels(attribution, extent_mass).cpu()
        if task is not None:
            progress.advance(task, len(pick))

    records, offset = [], 0
    for concept in selection:
        span = slice(offset, offset + len(concept.rows))
        offset = span.stop
        weights = torch.where(valid[span], concept.presence.cpu().double(), torch.zeros(len(concept.rows), dtype=torch.float64))
        score = float(weighted_mean_pairwise_cosine(encodings[span], weights)) if int(valid[span].sum()) >= 2 else math.nan
        extent = float(extents[span].nanmean())
        records.append({
            "concept": concept.concept, "images": len(concept.rows), "c2": score,
            "extent_pixels": extent, "extent_fraction": extent / (size[0] * size[1]),
            "averaged": bool(len(concept.rows) >= mean_min_images and math.isfinite(score)),
        })
    table = pd.DataFrame.from_records(records, columns=["concept", "images", "c2", "extent_pixels", "extent_fraction", "averaged"])
    averaged = table.loc[table["averaged"], "c2"]
    return C2Result(table, float(averaged.mean()) if len(averaged) else math.nan, c2_random)


def c2_from_tensors(
    presence: Tensor,
    maps: Tensor,
    features: Tensor,
    *,
    top_fraction: float = 0.05,
    min_images: int = 10,
    min_count: int = 2,
    mean_min_images: int = 5,
    seed: int = 0,
) -> C2Result:
    """`c2_scores` for data in memory: presence (N, M), input maps (N, M, H, W) of every concept in
    every image, dense features (N, D, h, w); concepts and images are indices into these."""
    if presence.ndim != 2 or maps.shape[:2] != presence.shape or maps.ndim != 4 or features.ndim != 4 \
            or features.shape[0] != presence.shape[0]:
        raise ValueError(
            f"need presence (N, M), maps (N, M, H, W), features (N, D, h, w); got {tuple(presence.shape)}, "
            f"{tuple(maps.shape)}, {tuple(features.shape)}"
        )
    n = presence.shape[0]
    top = TopImages(selection_depth(n, top_fraction, min_images))
    top.add(presence, torch.arange(n))
    selection = select_concept_images(top.result(), top.n_positive, top_fraction, min_images, min_count)
    return c2_scores(
        selection, torch.arange(n), lambda rows, concepts: maps[rows, concepts], lambda rows: features[rows],
        tuple(maps.shape[2:]), mean_min_images=mean_min_images, seed=seed,
    )
