"""The backbone side of CE-FAM: activation maps of several layers inside one autograd graph.

`tapped_forward` runs the whole model once and returns its logits with the outputs A^l of the
chosen layers. Each layer's own output tensor is kept and a clone goes on through the network:
later in-place ops (a following ReLU(inplace=True)) cannot alter the kept maps, and since the
clone is computed from the kept tensor, the derivative of anything computed from the kept maps
(the translator's scores) reaches A^l through both paths — its own pool and the later layers —
which is the total derivative the authors' Grad-CAM hooks take (regions.concept_betas_total).
`lib.models.layers.extract_layers` instead hands out copies that later layers never see.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lib.models.layers import resolve_layer

__all__ = ["tapped_forward"]


def tapped_forward(model: nn.Module, x: Tensor, names: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """(the model's output on x, the outputs (B, C, H, W) of layers `names` in that order).

    Gradients flow when x requires grad (or the parameters do) and grad mode is on. ValueError
    for an unknown layer (listing the valid names), a layer that runs more than once or not at
    all, or one whose output is not a (B, C, H, W) map.
    """
    modules = {name: resolve_layer(model, name) for name in names}
    kept: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> Tensor:
            if name in kept:
                raise ValueError(f"layer {name!r} runs more than once per forward; its activation maps are ambiguous")
            if not isinstance(output, Tensor) or output.ndim != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"layer {name!r} returns {shape}; CE-FAM needs activation maps (B, C, H, W)")
            kept[name] = output
            return output.clone()  # what the rest of the network sees (and may modify in place)

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in kept]
    if missing:
        raise ValueError(f"layers {missing} did not run in the forward pass of {type(model).__name__}")
    return out, [kept[name] for name in names]
