"""CE-FAM for a batch of images: concept scores, regions at every layer, association scores and
the contributions of each image's top concepts to its predicted class.

One forward of the backbone (taps.tapped_forward_with_prefixes) gives the logits and the
activation maps A^l of the translator's layers (a ViT layer's patch grid; taps.py). The Grad-CAM weights come from regions.py:

* beta "total" — dS^t/dA^l through the backbone as well (`concept_betas_total`: min(M, D, C)
  backward rows per batch, not one per concept, or one forward JVP per channel of every layer
  but the last when that is fewer). This is the paper's Grad-CAM (eq. 12)
  and what the authors' hooks compute; for the last layer it equals the Jacobian method.
* beta "jacobian" — through the translator only (`concept_betas`: one Jacobian of h per image,
  no backbone backward). Exact for the last layer; for earlier layers it leaves out the paths
  through the later layers whose pools also enter z_cat.

Association scores mask z^l (association.association_scores); the Top-1 layer of each concept is
the one with the highest. Contributions (association.class_contribution) mask A^l at each top
concept's Top-1 layer and re-run the backbone's tail from there (lib.models.layers.split_at).
Defaults are the authors' code (association.py's docstring says where the paper's text differs):
right-hand sums, 8 concepts per image, each masked map replaced by its own spatial mean before the
last layer, negative contributions dropped (stored as 0, like a concept never computed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lib.methods.cefam.association import association_scores, class_contribution, class_masking_curves
from lib.methods.cefam.regions import concept_betas, concept_betas_total, concept_regions, pool_features
from lib.methods.cefam.taps import grid_tail, tapped_forward_with_prefixes
from lib.methods.cefam.translator import Translator

__all__ = ["BatchExplanation", "ExplainSettings", "FigureDetails", "explain_batch", "explain_details", "top_contributions"]


@dataclass(frozen=True)
class ExplainSettings:
    """cefam.regions params (see lib/core/params.py)."""

    beta: Literal["total", "jacobian"] = "total"
    top_k: int = 20
    score: Literal["softmax", "sigmoid", "cosine"] = "softmax"
    rule: Literal["trapezoid", "right"] = "right"
    contribution_concepts: int = 8
    contribution_fill: Literal["mean", "spatial"] = "spatial"
    negatives: Literal["drop", "keep"] = "drop"
    chunk: int = 16
    beta_chunk: int | None = None  # beta "total": rows per batched backward, or tangents per vmapped JVP; None = sized for the device


@dataclass(frozen=True)
class BatchExplanation:
    """CE-FAM's outputs for B images, M concepts and the L explained layers (float32, detached)."""

    logits: Tensor  # (B, outputs): the backbone's
    target: Tensor  # (B,): the backbone output whose probability the contributions watch
    presence: Tensor  # (B, M): S^t
    association: Tensor  # (B, M, L)
    maps: list[Tensor]  # L x (B, M, h_l, w_l): R^l_t
    contribution: Tensor  # (B, M): 0 except for each image's top concepts (and, negatives "drop", 0 where negative)


def top_contributions(
    tails: Sequence[Callable[[Tensor], Tensor]],
    maps: Sequence[Tensor],
    importance: Sequence[Tensor],
    best: Tensor,
    top: Tensor,
    target: Tensor,
    *,
    k: int = 20,
    fills: Sequence[str | None] | None = None,
    rule: Literal["trapezoid", "right"] = "right",
    chunk: int = 64,
    prefixes: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Contribution (B, M) of concepts `top` (B, T) of each image to class `target` (B,), masked at
    each concept's best layer `best` (B, M) (an index into the L layers); 0 elsewhere.

    tails[l]: the backbone from layer l on; maps[l]: its activation maps (B, C_l, H_l, W_l);
    importance[l]: beta * z (B, M, C_l); fills[l]: None (the paper's m^l) or "spatial". The
    (image, concept) pairs of each layer go through the tail `chunk` pairs at a time, each pair
    bringing K+1 masked copies of its maps. prefixes[l]: a ViT layer's class/register tokens
    (B, P, C) (taps.tapped_forward_with_prefixes), which its tail needs back beside the masked maps.
    """
    b, m = best.shape
    out = torch.zeros(b, m, dtype=torch.float32, device=best.device)
    images = torch.arange(b, device=best.device)[:, None].expand_as(top)
    chosen = best.gather(1, top)  # (B, T): the best layer of each top concept
    for layer, (tail, a, imp) in enumerate(zip(tails, maps, importance, strict=True)):
        pick = chosen == layer
        if not pick.any():
            continue
        b_idx, t_idx = images[pick], top[pick]
        fill = None if fills is None else fills[layer]
        prefix = None if prefixes is None else prefixes[layer]
        for start in range(0, len(b_idx), chunk):
            bi, ti = b_idx[start : start + chunk], t_idx[start : start + chunk]
            tail_i = grid_tail(tail, None if prefix is None else prefix[bi].detach())
            values = class_contribution(tail_i, a[bi].detach(), imp[bi, ti][:, None, :], target[bi], k=k, fill=fill, rule=rule)
            out[bi, ti] = values[:, 0].float()
    return out


def explain_batch(
    model: torch.nn.Module,
    x: Tensor,
    translator: Translator,
    text_emb: Tensor,
    layers: Sequence[str],
    explained: Sequence[int],
    tails: Sequence[Callable[[Tensor], Tensor]],
    settings: ExplainSettings,
    target: Callable[[Tensor], Tensor] | None = None,
) -> BatchExplanation:
    """Explain preprocessed images x (B, 3, H, W) for concepts text_emb (M, D).

    layers: the translator's layers (z_cat order); explained: indices into them of the layers to
    explain, with their tails (`split_at(model, layer)[1]`). target: logits (B, outputs) -> the
    output (B,) whose probability the contributions watch (default: the argmax, the prediction).
    The model and translator must be in eval mode; parameters may stay frozen (the graph hangs on x).
    """
    total = settings.beta == "total"
    with torch.enable_grad() if total else torch.no_grad():
        logits, maps, prefixes = tapped_forward_with_prefixes(model, x.detach().requires_grad_(total), layers)
        z_list, hw = pool_features(maps)
        if total:
            # forward mode (one JVP per channel) is open to map layers; ViT token layers go backward
            backbone = (model, x, layers) if all(p is None for p in prefixes) else None
            betas = concept_betas_total(translator, maps, text_emb, chunk_size=settings.beta_chunk, backbone=backbone)
        else:
            betas = concept_betas(translator, z_list, text_emb, hw)
    maps = [a.detach() for a in maps]
    z_list = [z.detach() for z in z_list]
    with torch.no_grad():
        presence = translator.scores(torch.cat(z_list, dim=1), text_emb)
        association = association_scores(
            translator, z_list, text_emb, betas, settings.top_k, score=settings.score, rule=settings.rule, chunk=settings.chunk
        )[..., list(explained)]
        regions = concept_regions([betas[i] for i in explained], [maps[i] for i in explained])
        importance = [betas[i] * z_list[i][:, None, :] for i in explained]
        top = presence.topk(min(settings.contribution_concepts, presence.shape[1]), dim=1).indices
        last = len(layers) - 1  # its masked maps reach the head only through the pool: "spatial" would change nothing
        fills = [None if settings.contribution_fill == "mean" or i == last else "spatial" for i in explained]
        logits = logits.detach().float()
        explained_output = logits.argmax(dim=1) if target is None else target(logits)
        contribution = top_contributions(
            tails, [maps[i] for i in explained], importance, association.argmax(dim=-1), top, explained_output,
            k=settings.top_k, fills=fills, rule=settings.rule, chunk=settings.chunk, prefixes=[prefixes[i] for i in explained],
        )
        if settings.negatives == "drop":  # the authors' positive_only: a negative contribution leaves the explanation
            contribution = contribution.clamp(min=0)
    return BatchExplanation(logits, explained_output, presence.float(), association.float(), [r.float() for r in regions], contribution)


@dataclass(frozen=True)
class FigureDetails:
    """What the figures of one explained image show beyond the stores (float32, detached)."""

    class_cam: Tensor  # (h, w): Grad-CAM of the explained output at the translator's last layer
    class_curves: list[Tensor]  # T x (K_l+1,): Fig. 5b, the class score's relative drop as a concept's top channels are masked
    layers: Tensor  # (T,): index into `explained` of the layer each curve masks (the concept's Top-1 layer)


def explain_details(
    model: torch.nn.Module,
    x: Tensor,
    translator: Translator,
    text_emb: Tensor,
    layers: Sequence[str],
    explained: Sequence[int],
    tails: Sequence[Callable[[Tensor], Tensor]],
    settings: ExplainSettings,
    concepts: Tensor,
    best: Tensor,
    target: Callable[[Tensor], Tensor] | None = None,
) -> FigureDetails:
    """The class Grad-CAM and the masking curves behind the contributions of one image x (1, 3, H, W)
    for `concepts` (T,), each masked at its Top-1 layer best (T,) (indices into `explained`), as
    explain_batch computes them (same betas, fill and tails). Cheap: T concepts of one image."""
    total = settings.beta == "total"
    text = text_emb[concepts]  # a concept's beta depends on its own text embedding only
    with torch.enable_grad():
        logits, maps, prefixes = tapped_forward_with_prefixes(model, x.detach().requires_grad_(True), layers)
        output = logits.argmax(dim=1) if target is None else target(logits.detach())
        last = maps[-1]
        # Grad-CAM of the explained output at the last layer: beta_k = spatial mean of d logit / d A_k
        grad = torch.autograd.grad(logits.gather(1, output[:, None]).sum(), last, retain_graph=True)[0]
        cam = (grad.mean(dim=(2, 3), keepdim=True) * last).sum(dim=1).relu()[0]
        if total:
            betas = concept_betas_total(translator, maps, text, chunk_size=settings.chunk)
    maps = [a.detach() for a in maps]
    z_list, hw = pool_features(maps)
    if not total:
        betas = concept_betas(translator, z_list, text, hw)
    curves = []
    with torch.no_grad():
        for t, j in enumerate(best.tolist()):
            i = explained[j]
            fill = None if settings.contribution_fill == "mean" or i == len(layers) - 1 else "spatial"
            prefix = None if prefixes[i] is None else prefixes[i].detach()
            importance = betas[i][:, t : t + 1] * z_list[i][:, None, :]
            curves.append(class_masking_curves(grid_tail(tails[j], prefix), maps[i], importance, output, k=settings.top_k, fill=fill)[0, 0])
    return FigureDetails(cam.detach().float(), [c.float() for c in curves], best)
