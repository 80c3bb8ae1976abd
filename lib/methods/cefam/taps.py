"""The backbone side of CE-FAM: activation maps of several layers inside one autograd graph.

`tapped_forward` runs the whole model once and returns its logits with the outputs A^l of the
chosen layers, kept by `lib.models.layers.forward_keeping_layers`: the network goes on with a clone
of each, so later in-place ops (a following ReLU(inplace=True)) cannot alter the kept maps, and the
derivative of anything computed from them (the translator's scores) reaches A^l through both paths
— its own pool and the later layers — which is the total derivative the authors' Grad-CAM hooks
take (regions.concept_betas_total).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lib.models.layers import forward_keeping_layers

__all__ = ["tapped_forward"]


def tapped_forward(model: nn.Module, x: Tensor, names: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """(the model's output on x, the outputs (B, C, H, W) of layers `names` in that order).

    Gradients flow when x requires grad (or the parameters do) and grad mode is on. ValueError
    for an unknown layer (listing the valid names), a layer that runs more than once or not at
    all, or one whose output is not a (B, C, H, W) map.
    """
    out, kept = forward_keeping_layers(model, x, names)
    for name, output in kept.items():
        if not isinstance(output, Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"layer {name!r} returns {shape}; CE-FAM needs activation maps (B, C, H, W)")
    return out, [kept[name] for name in names]
