"""CE-FAM in the evaluate stage: the regions stage's maps of the ground-truth concepts.

`cefam` gives each (image, concept) its Top-1 layer's map (the highest association score; paper
Table 2, A2); `cefam_best4` gives the maps of the `cefam.regions.candidates` layers with the
highest association scores and is scored by the best of them (paper Table 1). Maps are read
from ``cefam/regions.zarr`` (written for evaluate.split) and upsampled bilinearly from each
layer's grid to the image size, so maps of different layers compare. Concepts whose name is a
ground-truth concept are scored; CE-FAM has no class map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import Tensor

from lib.core.schema import CONTRIBUTION
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.evaluate.registry import ConceptContributions, ConceptMapMethod, ConceptMaps, EvalBatch, EvalContext, MethodFactory
from lib.methods.cefam.artifacts import REGION_ASSOCIATION, RegionsStore, map_array


@dataclass
class CefamMaps(ConceptMapMethod):
    """Region maps of `candidates` layers per concept, best association score first."""

    store: RegionsStore
    columns: Tensor  # store concept columns that are ground-truth concepts
    concepts: Tensor  # their ground-truth ids
    candidates: int
    contributions: zarr.Array  # cefam/concept_stats.zarr's (n, M) contributions, rows as the regions store's
    name: str

    def concept_maps(self, batch: EvalBatch) -> ConceptMaps | None:
        if self.columns.numel() == 0:
            return None
        device = batch.images.device
        rows = self.store.rows(batch.index.cpu().numpy())  # eval batches come in row order, and so do the store's rows
        columns = self.columns.numpy()
        association = torch.from_numpy(read_rows(self.store.group[REGION_ASSOCIATION], rows)[:, columns]).to(device)
        size = tuple(batch.images.shape[1:3])
        layers = torch.stack([
            F.interpolate(
                torch.from_numpy(read_rows(self.store.group[map_array(layer)], rows)[:, columns]).to(device, torch.float32),
                size=size, mode="bilinear", align_corners=False,
            )
            for layer in self.store.layers
        ], dim=2)  # (B, M', L, H, W)
        order = association.topk(min(self.candidates, association.shape[-1]), dim=-1).indices  # (B, M', K)
        maps = layers.gather(2, order[..., None, None].expand(-1, -1, -1, *size))
        if self.candidates == 1:
            return ConceptMaps(maps[:, :, 0], self.concepts.to(device))
        return ConceptMaps(maps, self.concepts.to(device), order, tuple(self.store.layers))  # layer shares: Fig. A1


    def concept_contributions(self, batch: EvalBatch) -> ConceptContributions | None:
        """CE-FAM's concept-to-class contribution (its masking AUC) of the concepts the regions stage scored
        for each image (`cefam.regions.contribution_concepts` of highest S^t); NaN for the others."""
        if self.columns.numel() == 0:
            return None
        rows = self.store.rows(batch.index.cpu().numpy())
        values = read_rows(self.contributions, rows)[:, self.columns.numpy()]
        values = np.where(values != 0, values, np.nan)  # the store writes 0 for concepts it did not score
        return ConceptContributions(torch.from_numpy(values).to(batch.images.device), self.concepts.to(batch.images.device))


def _factory(name: str, top1: bool) -> MethodFactory:
    def factory(context: EvalContext) -> CefamMaps | None:
        layout = context.layout
        if not layout.cefam_regions.exists():
            return None
        n_images = open_store(layout.images)["images"].shape[0]
        store = RegionsStore.open(layout.cefam_regions, n_images)
        columns, concepts = context.truth.concept_ids(store.concepts)
        candidates = 1 if top1 else context.params.cefam.regions.candidates
        contributions = open_store(layout.concept_stats("cefam"))[CONTRIBUTION]
        return CefamMaps(store, columns, concepts, candidates, contributions, name)

    return factory


FACTORIES: dict[str, MethodFactory] = {"cefam": _factory("cefam", top1=True), "cefam_best4": _factory("cefam_best4", top1=False)}
