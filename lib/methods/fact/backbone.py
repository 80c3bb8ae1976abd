"""The backbone FaCT explains, cut at its layer: loading and checks, its logit bias, and input-level
concept maps.

The SAE works on the stored feature maps of `fact.layer` (features/<layer>.zarr), so the backbone is
needed only for what lies after the layer (the tail: the logits, their gradients) and, for input-level
maps, before it. Its outputs keep the backbone's class space; the dataset's classes map onto them as
the features stage recorded (lib/models/classes.py), so FaCT explains the logit of the output its
predicted dataset class maps onto. With backbone.new_head nothing maps: FaCT then explains the
backbone's own top output, and its predictions are no dataset class (-1).

Input-level maps (FaCT's concept visualisation and the C²-Score's attributions). On a B-cos backbone
in explanation mode, x -> P_j is dynamic linear in the network's input [x, 1 - x] (AddInverse), with
weights W_j(x) = dP_j/d[x, 1 - x]; the map sum_ch [x, 1 - x] * W_j(x) is then P_j's exact share per
pixel (it sums to P_j: the SAE's codes are positively homogeneous in the features). On other
backbones the same formula with the preprocessed input x is gradient x input.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from bcos.data.transforms import AddInverse
from torch import Tensor, nn

from lib.core.errors import UserError, user_error_for
from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.stores import open_store
from lib.kernels.preprocess import Preprocess
from lib.methods.fact.contributions import detached_dynamic_weights
from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.methods.fact.streams import fact_layer
from lib.models.backbones import check_backbone, load_backbone_checked
from lib.models.classes import ClassMap, read_class_map
from lib.models.layers import check_layers, extract_layers, split_at

__all__ = ["FactBackbone", "check_fact", "load_fact_backbone"]


def check_fact(config: Params) -> None:
    """The FaCT stages' checks before any work: the backbone section and that it has fact.layer."""
    check_layers(check_backbone(config.backbone), [fact_layer(config)], "fact.layer")


@dataclass
class FactBackbone:
    """The backbone (eval mode, frozen, on its device) and its tail after `layer`."""

    model: nn.Module
    layer: str
    tail: nn.Module  # the layer's output (B, C, H, W) -> logits (B, outputs)
    preprocess: Preprocess
    class_map: ClassMap | None  # None: backbone.new_head
    model_id: str

    @property
    def dynamic_linear(self) -> bool:
        """Whether the tail is B-cos (has bcos's explanation mode): then contributions are complete."""
        return any(hasattr(m, "set_explanation_mode") for m in self.tail.modules())

    def explained_output(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted dataset class, the backbone output it maps onto), both (B,), from logits (B, outputs);
        with backbone.new_head (-1, the top output)."""
        if self.class_map is None:
            outputs = logits.argmax(dim=1)
            return torch.full_like(outputs, -1), outputs
        classes = self.class_map.predict(logits)
        return classes, self.class_map.output_of(classes)

    @cached_property
    def tail64(self) -> nn.Module:
        """A float64 copy of the tail (references that must keep more digits than float32 has)."""
        return copy.deepcopy(self.tail).double()

    @torch.no_grad()
    def unbiased_logits(self, feats: Tensor) -> Tensor:
        """y - b (B, outputs) in float64 for feature maps (B, C, H, W): the tail's logits minus its
        logits for an all-zero map, b (on a dynamic-linear tail y = W(x) x + b, b its logit bias; B-cos:
        its LogitLayer's). Float64, because in float32 the difference of two nearly equal logits (an
        untrained network's) keeps only a few digits, too few to check completeness against."""
        x = feats.double()
        return self.tail64(x) - self.tail64(torch.zeros_like(x[:1]))

    def input_weights(self, images: Tensor, sae: BiasFreeTopKSAE, explained: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """(inputs, W): the tensor the network's weights act on (B-cos: [x, 1 - x], (B, 6, H, W); else
        the preprocessed x) and the gradient W of explained(codes) (B,) with respect to it, for uint8
        images (B, H, W, 3) on the model's device; codes (B, h*w, J) are the SAE's at the layer. In
        explanation mode, so on B-cos W is the dynamic linear map W(x) (module doc). One backward."""
        x = self.preprocess(images).requires_grad_(True)
        with torch.enable_grad(), detached_dynamic_weights(self.model), _network_input(self.model, x) as inputs:
            feats = extract_layers(self.model, x, [self.layer])[self.layer]
            b, c, h, w = feats.shape
            codes = sae.encode(feats.permute(0, 2, 3, 1).reshape(b * h * w, c)).reshape(b, h * w, -1)
            (grad,) = torch.autograd.grad(explained(codes).sum(), inputs[0])
        return inputs[0].detach(), grad.detach()

    def input_maps(self, images: Tensor, sae: BiasFreeTopKSAE, concepts: Tensor) -> Tensor:
        """Input-level map (B, H, W) of concept concepts[b]'s presence P in image b, for uint8 images
        (B, H, W, 3) on the model's device (module doc: B-cos dynamic linear contributions, else
        gradient x input). One backward for the whole batch; repeat an image to map several concepts."""
        index = concepts.long()[:, None]
        inputs, weights = self.input_weights(images, sae, lambda codes: codes.sum(dim=1).gather(1, index.to(codes.device))[:, 0])
        return (weights * inputs).sum(dim=1)


@contextmanager
def _network_input(model: nn.Module, x: Tensor) -> Iterator[list[Tensor]]:
    """[the tensor the network's weights act on]: a B-cos network's [x, 1 - x] (the output of its
    AddInverse, captured as it runs), else x itself."""
    modules = [m for m in model.modules() if isinstance(m, AddInverse)]
    if len(modules) > 1:
        raise ValueError(f"{type(model).__name__} has {len(modules)} AddInverse modules; expected at most one")
    if not modules:
        yield [x]
        return
    captured: list[Tensor] = []
    handle = modules[0].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def load_fact_backbone(config: Params, layout: Layout, device: torch.device) -> FactBackbone:
    """The configured backbone, checked against the stored features of fact.layer (same weights) and
    cut after that layer; UserError when the features are stale."""
    layer = fact_layer(config)
    loaded = load_backbone_checked(config.backbone)
    model = loaded.model.to(device).eval()
    stored = open_store(layout.features(layer)).attrs.get("model_id")
    if stored != loaded.model_id:
        raise UserError(
            f"{layout.features(layer)} was computed by {stored}, not by the configured backbone {loaded.model_id}",
            key="backbone", fix="rerun the features stage (dvc repro)",
        )
    class_map = read_class_map(open_store(layout.logits).attrs, layout.logits)
    with user_error_for("fact.layer", layer, fix="split at a block or stage output, e.g. 'layer3' of a ResNet"):
        _, tail = split_at(model, layer)
    return FactBackbone(model, layer, tail.eval(), loaded.preprocess, class_map, loaded.model_id)
