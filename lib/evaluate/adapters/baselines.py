"""Baselines of the evaluate stage: random maps, the centre prior, and CAMs of the backbone.

They give the explanation methods' scores their context: `random` is chance level for concept
maps and segmentation, `centre` the photographer's bias object masks share, and Grad-CAM,
Grad-CAM++ and Score-CAM of the backbone (for the true class) the usual zero-shot segmentation
baselines (SALF-CBM Table 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor, nn

from lib.evaluate.registry import ConceptMapMethod, ConceptMaps, EvalBatch, EvalContext, MethodFactory
from lib.kernels.cam import CAM_METHODS, CamMethod, cam_maps, centre_prior, random_maps
from lib.kernels.preprocess import Preprocess
from lib.models.backbones import load_backbone
from lib.models.layers import resolve_layer
from lib.models.weights import parse_weights


def batch_seed(seed: int, batch: EvalBatch, stream: int) -> int:
    """A seed for one batch's random maps, from the run seed, the batch's first store row and a
    stream id (concept vs class maps), so reruns draw the same maps."""
    return int(np.random.SeedSequence([seed, int(batch.index[0]), stream]).generate_state(1)[0])


@dataclass
class RandomMaps(ConceptMapMethod):
    """i.i.d. uniform maps at image resolution for every ground-truth concept and for the class."""

    n_concepts: int
    seed: int
    name: str = "random"

    def concept_maps(self, batch: EvalBatch) -> ConceptMaps:
        b, h, w, _ = batch.images.shape
        maps = random_maps((b, self.n_concepts, h, w), batch_seed(self.seed, batch, 0), batch.images.device)
        return ConceptMaps(maps, torch.arange(self.n_concepts, device=batch.images.device))

    def class_maps(self, batch: EvalBatch) -> Tensor:
        b, h, w, _ = batch.images.shape
        return random_maps((b, h, w), batch_seed(self.seed, batch, 1), batch.images.device)


@dataclass
class CentrePrior(ConceptMapMethod):
    """A centred Gaussian as every image's class map."""

    name: str = "centre"

    def class_maps(self, batch: EvalBatch) -> Tensor:
        b, h, w, _ = batch.images.shape
        return centre_prior(b, h, w, device=batch.images.device)


@dataclass
class CamBaseline(ConceptMapMethod):
    """A CAM of the backbone at `layer` for each image's true class."""

    name: CamMethod
    model: nn.Module
    layer: nn.Module
    preprocess: Preprocess
    batch_size: int

    def class_maps(self, batch: EvalBatch) -> Tensor:
        # the true class: the target mask is that class's object, a CAM of another class would be scored against it
        return cam_maps(self.model, self.layer, self.preprocess(batch.images), batch.labels, self.name, self.batch_size)


def _random(context: EvalContext) -> RandomMaps:
    return RandomMaps(context.truth.n_concepts, context.params.evaluate.seed)


def _centre(context: EvalContext) -> CentrePrior:
    return CentrePrior()


@cache
def _backbone(
    arch: str, weights: str | None, layer: str, num_classes: int, device: torch.device
) -> tuple[nn.Module, nn.Module, Preprocess]:
    """The backbone in eval mode on `device`, its CAM layer and preprocessing; loaded once for all CAMs."""
    loaded = load_backbone(arch, weights, num_classes=num_classes)
    model = loaded.model.to(device).eval()
    return model, resolve_layer(model, layer), loaded.preprocess


def _weights_missing(weights: str | None) -> bool:
    """True when `weights` names a local file that does not exist (yet): its training stage has not run."""
    try:
        parse_weights(weights)
    except ValueError:
        return True
    return False


def _cam_factory(method: CamMethod) -> MethodFactory:
    def factory(context: EvalContext) -> CamBaseline | None:
        params = context.params
        if method not in params.evaluate.cam_methods or _weights_missing(params.backbone.weights):
            return None
        layer = params.evaluate.cam_layer or params.features.layers[-1]
        model, target, preprocess = _backbone(
            params.backbone.arch, params.backbone.weights, layer, len(context.truth.class_names), context.device
        )
        return CamBaseline(method, model, target, preprocess, params.evaluate.batch_size)

    return factory


FACTORIES: dict[str, MethodFactory] = {"random": _random, "centre": _centre, **{m: _cam_factory(m) for m in CAM_METHODS}}
