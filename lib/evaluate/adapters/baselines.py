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

from lib.core.params import BackboneParams
from lib.data.manifest import read_dataset_info
from lib.evaluate.registry import ConceptMapMethod, ConceptMaps, EvalBatch, EvalContext, MethodFactory
from lib.kernels.cam import CAM_METHODS, CamMethod, cam_maps, centre_prior, random_maps
from lib.kernels.preprocess import Preprocess
from lib.models.backbones import LoadedBackbone, load_backbone_checked
from lib.models.classes import ClassMap, resolve_class_map
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
    """A CAM of the backbone at `layer` for each image's true class (the backbone output it maps onto)."""

    name: CamMethod
    model: nn.Module
    layer: nn.Module
    preprocess: Preprocess
    batch_size: int
    class_map: ClassMap

    def class_maps(self, batch: EvalBatch) -> Tensor:
        # the true class: the target mask is that class's object, a CAM of another class would be scored against it
        targets = self.class_map.output_of(batch.labels)
        return cam_maps(self.model, self.layer, self.preprocess(batch.images), targets, self.name, self.batch_size)


def _random(context: EvalContext) -> RandomMaps:
    return RandomMaps(context.truth.n_concepts, context.params.evaluate.seed)


def _centre(context: EvalContext) -> CentrePrior:
    return CentrePrior()


@cache
def _backbone(settings: BackboneParams, layer: str, device: torch.device) -> tuple[LoadedBackbone, nn.Module]:
    """The backbone (its own head) in eval mode on `device` and its CAM layer; loaded once for all CAMs."""
    loaded = load_backbone_checked(settings)
    loaded.model.to(device).eval()
    return loaded, resolve_layer(loaded.model, layer)


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
        backbone, target = _backbone(params.backbone, layer, context.device)
        class_map = resolve_class_map(  # as the features stage resolved it (lib/models/classes.py)
            context.truth.class_names, read_dataset_info(context.layout.dataset_info)["kind"], backbone.output_names,
            backbone.num_classes, class_map=params.backbone.class_map, new_head=params.backbone.new_head, arch=params.backbone.arch,
        )
        if class_map is None:  # backbone.new_head: the backbone has no output for the dataset's classes
            return None
        return CamBaseline(method, backbone.model, target, backbone.preprocess, params.evaluate.batch_size, class_map)

    return factory


FACTORIES: dict[str, MethodFactory] = {"random": _random, "centre": _centre, **{m: _cam_factory(m) for m in CAM_METHODS}}
