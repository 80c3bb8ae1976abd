"""The C²-Score of FaCT's concepts on the test split (the pieces are in lib/methods/fact/c2.py).

Per scored concept j: its top images by presence (`TopImages`, streamed: never N x J in memory);
in each, the input-level map of P_j (FactBackbone.input_maps: B-cos dynamic linear contributions,
else gradient x input), clipped at 0; encoded as the map-weighted mean of the CLIP's dense features
(clip_images.zarr "dense", h x w cells) centred by their mean over the split's images and cells.
The map is brought to the dense grid by the adjoint of bilinear upsampling (`pooling_matrix`), which
equals upsampling the features to the map's size (FaCT's way) without materialising them. The
score is the presence-weighted mean pairwise cosine; the baseline (`c2_random`) does the same with
random maps on the same images and weights (uniform noise floored at a random level per map, as
FaCT's baseline draws them).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from rich.progress import Progress
from torch import Tensor

from lib.methods.fact.backbone import FactBackbone
from lib.methods.fact.c2 import SelectedImages, encode_attribution, weighted_mean_pairwise_cosine
from lib.methods.fact.sae import BiasFreeTopKSAE

__all__ = ["TopImages", "c2_per_concept", "dense_mean", "pooling_matrix"]


class TopImages:
    """The top m images per concept by presence over a stream of batches (c2.select_images, streamed)."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.values: Tensor | None = None
        self.index: Tensor | None = None

    def add(self, presence: Tensor, rows: Tensor) -> None:
        """presence (B, J) of the images with store rows `rows` (B,)."""
        rows = rows.to(presence.device)[:, None].expand_as(presence)
        values = presence if self.values is None else torch.cat([self.values, presence])
        index = rows if self.index is None else torch.cat([self.index, rows])
        self.values, top = values.topk(min(self.m, values.shape[0]), dim=0)
        self.index = index.gather(0, top)

    def cpu(self) -> TopImages:
        """A copy on the CPU (to send to another torchrun rank)."""
        copy = TopImages(self.m)
        copy.values, copy.index = (None, None) if self.values is None else (self.values.cpu(), self.index.cpu())
        return copy

    def merge(self, other: TopImages) -> None:
        """Fold in the top images of another stream over other images (another torchrun rank's)."""
        if other.values is None:
            return
        if self.values is None:
            self.values, self.index = other.values, other.index
            return
        values = torch.cat([self.values, other.values.to(self.values.device)])
        index = torch.cat([self.index, other.index.to(self.index.device)])
        self.values, top = values.topk(min(self.m, values.shape[0]), dim=0)
        self.index = index.gather(0, top)

    def result(self) -> SelectedImages:
        """index (J, m) store rows, highest presence first; presence (J, m)."""
        if self.values is None:
            raise ValueError("no images added")
        return SelectedImages(index=self.index.T.contiguous(), presence=self.values.T.contiguous())


def pooling_matrix(grid: tuple[int, int], size: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """U (H*W, h*w): column c is grid cell c's one-hot map upsampled bilinearly to `size` (H, W), so
    sum_pixels A * upsample(F) = (A_flat @ U) . F_cells for any map A and features F on the grid."""
    h, w = grid
    basis = torch.eye(h * w, device=device).reshape(h * w, 1, h, w)
    return F.interpolate(basis, size=size, mode="bilinear", align_corners=False).reshape(h * w, -1).T.contiguous()


def dense_mean(dense: zarr.Array, rows: np.ndarray, batch: int) -> Tensor:
    """Mean dense feature (D',) over the images `rows` and all their cells, float64, streamed."""
    total, count = None, 0
    for start in range(0, len(rows), batch):
        block = torch.from_numpy(dense.get_orthogonal_selection((rows[start : start + batch],))).double()
        part = block.sum(dim=(0, 2, 3))
        total = part if total is None else total + part
        count += block.shape[0] * block.shape[2] * block.shape[3]
    return total / count


def _read(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows in any order (repeats allowed), reading each distinct row once."""
    unique, inverse = np.unique(rows, return_inverse=True)
    return array.get_orthogonal_selection((unique,))[inverse]


def c2_per_concept(
    backbone: FactBackbone,
    sae: BiasFreeTopKSAE,
    images: zarr.Array,
    dense: zarr.Array,
    mean: Tensor,
    selected: SelectedImages,
    concepts: Tensor,
    *,
    batch_size: int,
    seed: int,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """(C², random-map baseline), each (len(concepts),) float64, NaN where fewer than two images carry
    weight. `selected` holds every concept's top images (store rows) and presences; `concepts` the
    latents to score. Concepts go in groups of about `batch_size` (image, concept) pairs."""
    device = next(backbone.model.parameters()).device
    m = selected.index.shape[1]
    per_group = max(1, batch_size // m)
    pool: Tensor | None = None  # built once the maps' size is known
    generator = torch.Generator().manual_seed(seed)
    centre = mean.to(device, torch.float32)[None, :, None, None]
    scores, baseline = [], []
    task = progress.add_task("C²-Score", total=len(concepts) * m) if progress is not None else None
    for start in range(0, len(concepts), per_group):
        group = concepts[start : start + per_group]
        rows = selected.index[group].reshape(-1).cpu().numpy()
        latent = group.repeat_interleave(m)
        encodings, random_encodings = [], []
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            pixels = torch.from_numpy(_read(images, chunk)).to(device)
            maps = backbone.input_maps(pixels, sae, latent[lo : lo + batch_size]).clamp_min(0)
            if pool is None:
                pool = pooling_matrix(tuple(dense.shape[2:]), tuple(maps.shape[1:]), device)
            noise = torch.rand(maps.shape, generator=generator)
            noise = noise.clamp_min(torch.rand(len(chunk), 1, 1, generator=generator)).to(device)
            feats = torch.from_numpy(_read(dense, chunk)).to(device, torch.float32) - centre
            for target, attribution in ((encodings, maps), (random_encodings, noise)):
                pooled = (attribution.flatten(1) @ pool).reshape(len(chunk), *dense.shape[2:])
                target.append(encode_attribution(pooled, feats))
            if task is not None:
                progress.advance(task, len(chunk))
        weights = selected.presence[group].to(device)
        scores.append(weighted_mean_pairwise_cosine(torch.cat(encodings).reshape(len(group), m, -1), weights))
        baseline.append(weighted_mean_pairwise_cosine(torch.cat(random_encodings).reshape(len(group), m, -1), weights))
    return torch.cat(scores).double().cpu(), torch.cat(baseline).double().cpu()
