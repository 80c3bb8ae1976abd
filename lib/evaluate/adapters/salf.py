"""SALF-CBM in the evaluate stage: its concept maps and a class map per image.

Concept maps are the bottleneck's maps of the stored features, standardised per concept with the
train statistics of c* (the cubic cosine loss leaves each map's offset and scale free, so raw
maps are not comparable across concepts, and EPG needs a meaningful zero). Only concepts whose
name is a ground-truth concept are scored. Maps are drawn on the image by the bottleneck's grid
registration (lib.kernels.registration: each cell at its circle centre, as `explain` draws them),
not by the evaluator's plain resize, which would put cell (h, w) at ((h + 1/2) / G) of the image.

Class map (zero-shot segmentation). SALF-CBM §4.2 trains on the concept list "An image of a
{class}" and uses the class concept's map. Our concepts are attributes, so we use the evidence
the final layer sums for the predicted class l: sum_m W[l, m] z_m(x) over the object concepts,
z the standardised maps. Concepts of a scene type (the concept list's type "background") are
left out, as in the ground truth: they describe no object, and their maps are high exactly
off the object (a "grass" map is low on the object lying on the grass). With average pooling and
no scene concept, the map's spatial mean is exactly logit_l - b_l.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import zarr
from torch import Tensor

from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.evaluate.registry import ConceptContributions, ConceptMapMethod, ConceptMaps, EvalBatch, EvalContext
from lib.evaluate.truth import SCENE_TYPES
from lib.methods.salf.artifacts import SalfModel


@dataclass
class SalfMaps(ConceptMapMethod):
    """A trained SALF-CBM reading its backbone features from the features store."""

    model: SalfModel
    features: zarr.Array  # (N, C, h, w) of model.layer
    columns: Tensor  # bottleneck channels that are ground-truth concepts
    concepts: Tensor  # their ground-truth ids
    object_concepts: Tensor  # (M,) 1.0 for concepts that describe objects, 0.0 for scene types
    name: str = "salf"

    def _maps(self, batch: EvalBatch) -> Tensor:
        """Raw concept maps (B, M, G, G) of the batch's images, on the model's device."""
        rows = read_rows(self.features, batch.index.cpu().numpy())  # eval batches come in row order
        return self.model.concept_maps(torch.from_numpy(rows))

    def concept_maps(self, batch: EvalBatch) -> ConceptMaps | None:
        if self.columns.numel() == 0:
            return None
        maps = self.model.classifier.standardised_maps(self._maps(batch))
        chosen = self.model.registration.upsample(maps[:, self.columns.to(maps.device)])
        return ConceptMaps(chosen, self.concepts.to(maps.device))

    def class_maps(self, batch: EvalBatch) -> Tensor:
        raw = self._maps(batch)
        classifier = self.model.classifier
        _, logits = classifier.classify(raw)
        weights = classifier.weight.to(raw.device)[logits.argmax(dim=1)]  # (B, M): the predicted class's row
        weights = weights * self.object_concepts.to(weights.device)
        return self.model.registration.upsample(torch.einsum("bm,bmgh->bgh", weights, classifier.standardised_maps(raw)))

    def concept_contributions(self, batch: EvalBatch) -> ConceptContributions | None:
        """W[l, m]·c*[m] of the ground-truth concepts for the sparse layer's prediction l."""
        if self.columns.numel() == 0:
            return None
        activations, logits = self.model.classifier.classify(self._maps(batch))
        weights = self.model.classifier.weight.to(activations.device)[logits.argmax(dim=1)]
        columns = self.columns.to(activations.device)
        return ConceptContributions((weights * activations)[:, columns], self.concepts.to(activations.device))

    def accuracy_path(self) -> Sequence[tuple[float, float]]:
        return [(row["nonzeros_per_class"], row["val_acc"]) for row in self.model.lambda_path]


def salf_factory(context: EvalContext) -> SalfMaps | None:
    layout = context.layout
    if not (layout.salf_bottleneck.exists() and layout.salf_classifier.exists()):
        return None
    model = SalfModel.load(layout, context.device)
    columns, concepts = context.truth.concept_ids(model.classifier.concept_names)
    features = open_store(layout.features(model.layer))["features"]
    objects = torch.tensor([kind not in SCENE_TYPES for kind in model.concept_types], dtype=torch.float32)
    return SalfMaps(model, features, columns, concepts, objects)
