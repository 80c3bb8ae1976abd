"""The models whose decisions the methods explain, as functions of the images: the backbone,
SALF-CBM's concept model and the backbone with FaCT's SAE spliced in (CE-FAM explains the backbone
itself). The counterfactuals stage measures each concept's true effect on each of them.

All of them run from one backbone forward per batch: the layers SALF-CBM and FaCT read are captured
on the way to the backbone's logits. Scores are in the dataset's class space (the backbone's outputs
that the dataset's classes map onto, lib/models/classes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.stores import open_store
from lib.methods.fact.artifacts import load_sae
from lib.methods.fact.contributions import splice
from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.methods.fact.streams import fact_layer
from lib.methods.salf.artifacts import SalfModel
from lib.models.backbones import LoadedBackbone, load_backbone_checked
from lib.models.classes import ClassMap, read_class_map
from lib.models.layers import forward_with_layers, split_at

BACKBONE, SALF, FACT = "backbone", "salf", "fact"


@dataclass
class ExplainedModels:
    """The backbone and the concept models built on it that exist in this run."""

    backbone: LoadedBackbone
    class_map: ClassMap
    salf: SalfModel | None
    fact: tuple[str, BiasFreeTopKSAE, torch.nn.Module] | None  # (layer, SAE, the backbone's tail after it)

    @property
    def names(self) -> tuple[str, ...]:
        """The models scored, in output order."""
        return (BACKBONE,) + ((SALF,) if self.salf else ()) + ((FACT,) if self.fact else ())

    @torch.no_grad()
    def scores(self, images: Tensor) -> Tensor:
        """Class scores (B, len(names), classes) of uint8 images (B, H, W, 3) on the model's device."""
        layers = sorted(({self.salf.layer} if self.salf else set()) | ({self.fact[0]} if self.fact else set()))
        x = self.backbone.preprocess(images)
        logits, feats = forward_with_layers(self.backbone.model, x, layers) if layers else (self.backbone.model(x), {})
        outputs = torch.tensor(self.class_map.outputs, device=logits.device)
        scores = [logits[:, outputs]]
        if self.salf:
            _, salf_logits = self.salf.classifier.classify(self.salf.concept_maps(feats[self.salf.layer]))
            scores.append(salf_logits)
        if self.fact:
            layer, sae, tail = self.fact
            _, x_hat = splice(sae, feats[layer].float())
            scores.append(tail(x_hat)[:, outputs])
        return torch.stack([s.float() for s in scores], dim=1)


def load_explained_models(config: Params, layout: Layout, device: torch.device) -> ExplainedModels:
    """The backbone (checked against the stored features' model) and whichever of SALF-CBM's and
    FaCT's trained models exist."""
    backbone = load_backbone_checked(config.backbone)
    backbone.model.to(device).eval()
    class_map = read_class_map(open_store(layout.logits).attrs, layout.logits)
    if class_map is None:
        raise UserError(
            "the backbone has a new head (backbone.new_head): its outputs are no dataset class, so no true effect on a class logit exists",
            key="backbone.new_head", fix="set backbone.new_head: false",
        )
    stored = open_store(layout.logits).attrs.get("model_id")
    if stored != backbone.model_id:
        raise UserError(
            f"{layout.logits} was computed by {stored}, not by the configured backbone {backbone.model_id}",
            key="backbone", fix="rerun the features stage (dvc repro)",
        )
    salf = SalfModel.load(layout, device) if layout.salf_classifier.exists() and layout.salf_bottleneck.exists() else None
    fact = None
    if layout.fact_sae.exists():
        layer = fact_layer(config)
        sae, _ = load_sae(layout.fact_sae, device)
        _, tail = split_at(backbone.model, layer)
        fact = (layer, sae, tail.eval())
    return ExplainedModels(backbone, class_map, salf, fact)
