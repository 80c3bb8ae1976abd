"""C²-Score of any method with concept maps, through compare's function (lib/compare/c2.py) and FaCT's code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zarr

from lib.compare.c2 import c2_of_method, c2_row
from lib.core.params import load_params
from lib.evaluate.registry import ConceptMapMethod, ConceptMaps, EvalBatch


@dataclass
class _Maps(ConceptMapMethod):
    maps: torch.Tensor  # (N, K, H, W) of every image
    name: str = "m"

    def concept_maps(self, batch: EvalBatch) -> ConceptMaps:
        return ConceptMaps(self.maps[batch.index], torch.arange(self.maps.shape[1]))


def _world(n: int = 80, k: int = 4, size: int = 16, seed: int = 0) -> np.ndarray:
    """Disjoint concept masks (N, K, H, W): concept j, when present, a square in its own quadrant band."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, k, size, size), np.uint8)
    band = size // k
    for i in range(n):
        for j in np.flatnonzero(rng.random(k) < 0.6):
            top, left = rng.integers(0, size - 4), j * band
            masks[i, j, top : top + 4, left : left + band] = 1
    return masks


def test_ground_truth_maps_score_clearly_above_random_maps_with_the_gt_featurizer():
    config = load_params("params.yaml")
    masks = _world()
    n = len(masks)
    images, labels = zarr.array(np.zeros((n, 16, 16, 3), np.uint8)), zarr.array(np.zeros(n, np.int64))
    featurizer = zarr.array(masks)  # the gt featurizer: one 0/1 channel per concept

    def features(rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(featurizer.get_orthogonal_selection((rows.numpy(),))).float()

    truth = torch.from_numpy(masks).float()
    strength = truth.sum(dim=(2, 3)) * torch.rand(n, masks.shape[1], generator=torch.Generator().manual_seed(2))

    def presence(rows: torch.Tensor) -> torch.Tensor:  # > 0 exactly where the image shows the concept
        return strength[rows]

    noise = torch.rand(truth.shape, generator=torch.Generator().manual_seed(1))
    rows = np.arange(n)
    cpu = torch.device("cpu")
    good = c2_of_method(config, _Maps(truth), presence, images, labels, features, rows, cpu)
    bad = c2_of_method(config, _Maps(noise), presence, images, labels, features, rows, cpu)
    assert good.n_averaged == bad.n_averaged == masks.shape[1]
    assert good.c2_delta > 0.9
    assert abs(bad.c2_delta) < 0.3
    assert good.c2_delta > bad.c2_delta + 0.6
    assert good.c2_random == bad.c2_random  # the same seeded random baseline


def test_a_method_without_a_c2_gets_none():
    assert c2_row({}, "gradcam")["delta"] is None
