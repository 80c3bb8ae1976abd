"""FaCT in the evaluate stage: the SAE latent matched to each ground-truth concept, and a class map.

SAE latents have no names: the contributions stage matches one latent to each ground-truth concept
on the val split (lib/methods/fact/matching.py: the best Pearson correlation between the latent's
code and the concept mask's share of each feature-map cell; written to data/<name>/fact/matching.json
with how many concepts reached fact.match_threshold). Every ground-truth concept is scored with its
latent's map, found or not, so a poor match shows as a poor score rather than as a concept left out.

Concept map: the latent's code z_j at every cell of the layer's feature map (the SAE's own map of
the concept; its sum over cells is the presence P_j). Class map (zero-shot segmentation): where the
explained logit y_c - b of the spliced model's predicted class comes from, x_hat_p . dy_c/dx_hat_p
per cell, summed over the latents whose best ground-truth concept is an object concept: as in
SALF-CBM's class map, latents of the scene (the toy world's backgrounds) describe no object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import zarr
from torch import Tensor

from lib.core.schema import FEATURES
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.evaluate.registry import ConceptContributions, ConceptMapMethod, ConceptMaps, EvalBatch, EvalContext
from lib.evaluate.truth import SCENE_TYPES
from lib.methods.fact.artifacts import load_sae
from lib.methods.fact.backbone import FactBackbone, load_fact_backbone
from lib.methods.fact.contributions import concept_contributions, splice
from lib.methods.fact.matching import Matching
from lib.methods.fact.sae import BiasFreeTopKSAE


@dataclass
class FactMaps(ConceptMapMethod):
    """A trained FaCT SAE reading the backbone's features of its layer from the features store."""

    backbone: FactBackbone
    sae: BiasFreeTopKSAE
    features: zarr.Array  # (N, C, h, w) of the SAE's layer
    latents: Tensor  # (M',) the latent of each scored ground-truth concept
    concepts: Tensor  # (M',) their ground-truth ids
    object_latents: Tensor  # (J,) 1.0 for latents whose best ground-truth concept describes an object
    found: Tensor  # (M',) bool: the concept's latent reaches fact.match_threshold on val
    name: str = "fact"

    def _acts(self, batch: EvalBatch) -> Tensor:
        device = self.sae.atoms.device
        return torch.from_numpy(read_rows(self.features, batch.index.cpu().numpy())).to(device, torch.float32)

    def concept_maps(self, batch: EvalBatch) -> ConceptMaps:
        acts = self._acts(batch)
        with torch.no_grad():
            codes, _ = splice(self.sae, acts)
        b, _, h, w = acts.shape
        maps = codes[:, :, self.latents.to(codes.device)].transpose(1, 2).reshape(b, -1, h, w)
        return ConceptMaps(maps, self.concepts.to(maps.device))

    def concept_contributions(self, batch: EvalBatch) -> ConceptContributions:
        """C_j of each ground-truth concept's matched latent to the spliced model's predicted logit; NaN for
        concepts whose latent does not reach fact.match_threshold (no latent of theirs to credit)."""
        acts = self._acts(batch)
        with torch.no_grad():
            _, x_hat = splice(self.sae, acts)
            _, target = self.backbone.explained_output(self.backbone.tail(x_hat))
        out = concept_contributions(self.backbone.tail, self.sae, acts, target)
        values = out.contributions[:, self.latents.to(acts.device)]
        values = values.masked_fill(~self.found.to(acts.device), float("nan"))
        return ConceptContributions(values, self.concepts.to(acts.device))

    def class_maps(self, batch: EvalBatch) -> Tensor:
        acts = self._acts(batch)
        with torch.no_grad():
            codes, x_hat = splice(self.sae, acts)
            _, target = self.backbone.explained_output(self.backbone.tail(x_hat))
        out = concept_contributions(self.backbone.tail, self.sae, acts, target)
        b, c, h, w = acts.shape
        with torch.no_grad():
            objects = self.sae.decode(codes.reshape(b * h * w, -1) * self.object_latents.to(codes.device))
            return (out.grad * objects.reshape(b, h, w, c).permute(0, 3, 1, 2)).sum(dim=1)


def fact_factory(context: EvalContext) -> FactMaps | None:
    layout = context.layout
    if not (layout.fact_sae.exists() and layout.fact_matching.exists()):
        return None
    data = json.loads(layout.fact_matching.read_text())
    if not data["concepts"]:
        return None
    matching = Matching.from_json(data)
    backbone = load_fact_backbone(context.params, layout, context.device)
    sae, _ = load_sae(layout.fact_sae, context.device)
    columns, concepts = context.truth.concept_ids(list(matching.names))
    latents = torch.tensor(matching.latents, dtype=torch.int64)[columns]
    found = torch.tensor([score >= context.params.fact.match_threshold for score in matching.scores])[columns]
    kinds = [context.truth.concept_types[context.truth.concept_names.index(matching.names[k])] for k in matching.latent_concepts]
    objects = torch.tensor([kind not in SCENE_TYPES for kind in kinds], dtype=torch.float32)
    features = open_store(layout.features(backbone.layer))[FEATURES]
    return FactMaps(backbone, sae, features, latents, concepts, objects, found)
