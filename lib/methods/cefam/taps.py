"""The backbone side of CE-FAM: activation maps of several layers inside one autograd graph.

`tapped_forward` runs the whole model once and returns its logits with the activation maps A^l of
the chosen layers, kept by `lib.models.layers.forward_keeping_maps`: the network goes on with a
clone of each map, so later in-place ops (a following ReLU(inplace=True)) cannot alter the kept
maps, and the derivative of anything computed from them (the translator's scores) reaches A^l
through both paths — its own pool and the later layers — which is the total derivative the
authors' Grad-CAM hooks take (regions.concept_betas_total).

ViT backbones: a transformer block's output is tokens (B, N, C). A^l is then the patch grid
(B, C, h, w), token P + i*w + j at (i, j) (row-major, as the patch embedding flattens the
image), and the P class and register tokens are left out of A^l — they are no image location, so
they have no place in a region map or in z^l (the authors' ViT probe drops the class token the
same way). They are returned apart: the layer's tail needs them back to run on masked maps
(`grid_tail`). The network after the layer runs on tokens rebuilt from A^l, so β is the total
derivative there too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from lib.models.layers import forward_keeping_maps, tokens_from_grid

__all__ = ["grid_tail", "tapped_forward", "tapped_forward_with_prefixes"]


def tapped_forward_with_prefixes(
    model: nn.Module, x: Tensor, names: Sequence[str]
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """(the model's output on x, the maps (B, C, H, W) of layers `names` in that order, and per
    layer its prefix tokens (B, P, C) for a ViT layer, None for a map layer).

    Gradients flow when x requires grad (or the parameters do) and grad mode is on. ValueError
    for an unknown layer (listing the valid names), a layer that runs more than once or not at
    all, or one whose output is neither a (B, C, H, W) map nor (B, N, C) tokens over a square grid.
    """
    out, maps, prefixes = forward_keeping_maps(model, x, names)
    return out, [maps[name] for name in names], [prefixes[name] for name in names]


def tapped_forward(model: nn.Module, x: Tensor, names: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """`tapped_forward_with_prefixes` without the prefix tokens: (output, maps)."""
    out, maps, _ = tapped_forward_with_prefixes(model, x, names)
    return out, maps


def grid_tail(tail: Callable[[Tensor], Tensor], prefix: Tensor | None) -> Callable[[Tensor], Tensor]:
    """A layer's tail (`split_at(model, layer)[1]`) that takes maps (R, C, h, w): for a ViT layer
    the maps go back to tokens with the prefix tokens (B, P, C) of their images, the R rows being
    R / B consecutive rows per image (masked copies of one image's maps); a map layer's tail as is."""
    if prefix is None:
        return tail

    def run(maps: Tensor) -> Tensor:
        if maps.shape[0] % prefix.shape[0]:
            raise ValueError(f"{maps.shape[0]} maps are no whole number of copies per image of {prefix.shape[0]} images")
        return tail(tokens_from_grid(maps, prefix.repeat_interleave(maps.shape[0] // prefix.shape[0], dim=0)))

    return run
