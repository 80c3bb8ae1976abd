"""CE-FAM association scores (paper §3.3) and concept contributions (§3.4): masking AUCs.

Channel k of layer l matters to concept t by beta^t_k * z^l_k. The top K (20) channels are
replaced one at a time, in descending order, by a fill value, and the score is recorded after
each replacement: step j = 0 … K has the top j channels replaced. The drop curve d_j =
score_0 - score_j (relative: divided by score_0) is integrated over x = j/K in [0, 1], so the
area is a mean drop, comparable across layers with different channel counts.

Where the paper's text and the authors' code (utils/cefam.py, region_cefam / contribution_cefam;
converter.py; utils/resnet.py, mask_predict; evaluate.py) differ or the text is silent, the
defaults follow the code and the text's reading stays available (the regions stage's params):

* area (`rule`): the text says "AUC"; the code adds d_j / K for j = 0 … K (d_0 = 0), the right
  Riemann sum over x = j/K: `rule="right"` (default). `rule="trapezoid"` is the trapezoid over
  j/K, which differs by d_K / (2K) and can change a concept's Top-1 layer.
* association fill: the text's m^l = (1/|C|) sum_k z^l_k, the image's own mean over the layer's
  channels (one scalar per image), which is also what the code's MapConverter does. `fill` may
  instead give per-channel values, e.g. the layer's dataset means m^l_k.
* score: the code does not mask the raw S^t: for CLIP it takes the softmax over all concepts of
  the scaled cosines (SigLIP: sigmoid), and the relative drop (score_0 - score_j) / score_0.
  `score="cosine"`, `relative=False` give the text's plain drop of S^t.
* contribution fill: the text masks with m^l as above; the code's mask_predict replaces a masked
  channel's map by its own spatial mean before the last layer (z unchanged, only the spatial
  pattern removed): `fill="spatial"`, the regions stage's default; at the last layer both use the
  layer mean (a spatial-mean fill would change nothing there, the head sees only the pool).
* how many concepts and which are kept (explain.py, not here): the code explains the 8 concepts
  of highest score and drops those with a negative contribution (positive_only); the text shows
  negative contributions (Fig. 7) and gives no number.

contribution: class probability p^c from the backbone's tail, channels ranked by the concept's
beta * z at the chosen layer, relative drop; negative when masking raises p^c.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.methods.cefam.translator import concept_scores

__all__ = [
    "DEFAULT_TOP_K",
    "RULES",
    "SCORES",
    "association_scores",
    "best_layer",
    "candidate_layers",
    "channel_importance",
    "class_contribution",
    "class_masking_curves",
    "curve_area",
    "masking_curves",
]

DEFAULT_TOP_K = 20
Score = Literal["softmax", "sigmoid", "cosine"]
Rule = Literal["trapezoid", "right"]
SCORES: tuple[str, ...] = get_args(Score)
RULES: tuple[str, ...] = get_args(Rule)
Fill = Tensor | Literal["spatial"] | None


def channel_importance(betas: Sequence[Tensor], z_list: Sequence[Tensor]) -> list[Tensor]:
    """beta^t_k * z^l_k (B, M, C_l) per layer, from betas (B, M, C_l) and pooled features (B, C_l)."""
    return [b * z[:, None, :].to(b.dtype) for b, z in zip(betas, z_list, strict=True)]


def curve_area(drops: Tensor, rule: Rule = "right") -> Tensor:
    """Area under drop curves (..., K+1) over x = j/K in [0, 1]: (...)."""
    k = drops.shape[-1] - 1
    if k < 1:
        raise ValueError(f"drop curves need at least 2 points (K >= 1); got shape {tuple(drops.shape)}")
    if rule == "trapezoid":
        return torch.trapezoid(drops, dx=1.0 / k, dim=-1)
    if rule == "right":
        return drops[..., 1:].sum(dim=-1) / k
    raise ValueError(f"rule must be one of {RULES}; got {rule!r}")


def _rank_positions(importance: Tensor, k: int) -> Tensor:
    """Rank (0 = most important) of each channel among the top k of (..., C), k for the rest."""
    top = importance.topk(k, dim=-1).indices
    ranks = torch.arange(k, device=importance.device).expand_as(top)
    return torch.full_like(importance, k, dtype=torch.long).scatter_(-1, top, ranks)


def _replaced(pos: Tensor, k: int) -> Tensor:
    """(B, m, K+1, C) bool: step j replaces the channels ranked below j."""
    steps = torch.arange(k + 1, device=pos.device)
    return pos[:, :, None, :] < steps[:, None]


def _channel_fill(z: Tensor, fill: Tensor | None) -> Tensor:
    """Fill values (B, C) of pooled features z (B, C): the image's channel mean m^l or `fill`."""
    if fill is None:
        return z.mean(dim=1, keepdim=True).expand_as(z)
    fill = torch.as_tensor(fill, dtype=z.dtype, device=z.device)
    if fill.shape not in {(z.shape[1],), tuple(z.shape)}:
        raise ValueError(f"fill must have shape ({z.shape[1]},) or {tuple(z.shape)}; got {tuple(fill.shape)}")
    return fill.expand_as(z)


def _drops(values: Tensor, relative: bool) -> Tensor:
    drop = values[..., :1] - values
    return drop / values[..., :1] if relative else drop


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")


def masking_curves(
    translator: nn.Module,
    z_list: Sequence[Tensor],
    text_emb: Tensor,
    betas: Sequence[Tensor],
    k: int = DEFAULT_TOP_K,
    fill: Sequence[Tensor | None] | None = None,
    score: Score = "softmax",
    relative: bool = True,
    concepts: Tensor | None = None,
    chunk: int | None = None,
) -> list[Tensor]:
    """Drop curves (B, M', K_l+1) per layer of each concept's score as its top channels are masked.

    z_list: pooled features (B, C_l) in the translator's order; text_emb (M, D); betas (B, M, C_l)
    per layer (from `concept_betas`); K_l = min(k, C_l). fill: per layer None (the image's channel
    mean, the paper's m^l) or per-channel values (C_l,) / (B, C_l). concepts: indices of the M'
    concepts to score (default all; the softmax still runs over all M). For each layer the K+1
    masked copies of z_cat of every image and concept go through the translator in one forward
    (B, m, K+1, sum C), m = `chunk` concepts at a time (default all). Memory per forward is
    B*m*(K+1)*(sum C + D) values, plus B*m*(K+1)*M for the softmax: at ImageNet scale (sum C =
    3840, M ~ 1000) pass a chunk. Runs without grad.
    """
    _check_k(k)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    if len(betas) != len(z_list):
        raise ValueError(f"betas and z_list must have one entry per layer; got {len(betas)} and {len(z_list)}")
    fills = [None] * len(z_list) if fill is None else list(fill)
    if len(fills) != len(z_list):
        raise ValueError(f"fill must have one entry per layer; got {len(fills)} for {len(z_list)} layers")
    z_cat = torch.cat(list(z_list), dim=1)
    b, total = z_cat.shape
    text = F.normalize(text_emb.to(z_cat), dim=-1)
    scale, bias = getattr(translator, "scale", 100.0), getattr(translator, "bias", 0.0)
    concepts = torch.arange(text.shape[0]) if concepts is None else torch.as_tensor(concepts)
    concepts = concepts.to(z_cat.device)
    step = len(concepts) if chunk is None else chunk
    curves = []
    offset = 0
    with torch.no_grad():
        for z, beta, layer_fill in zip(z_list, betas, fills, strict=True):
            c = z.shape[1]
            k_l = min(k, c)
            importance = beta[:, concepts] * z[:, None, :].to(beta.dtype)  # (B, M', C)
            filled = _channel_fill(z.to(z_cat.dtype), layer_fill)
            parts = []
            for start in range(0, len(concepts), step):
                ids = concepts[start : start + step]
                mask = _replaced(_rank_positions(importance[:, start : start + step], k_l), k_l)  # (B, m, K+1, C)
                m = mask.shape[1]
                inputs = z_cat[:, None, None, :].expand(b, m, k_l + 1, total).clone()
                inputs[..., offset : offset + c] = torch.where(mask, filled[:, None, None, :], z[:, None, None, :].to(z_cat.dtype))
                emb = translator(inputs.reshape(-1, total)).reshape(b, m, k_l + 1, -1)
                if score == "softmax":
                    # all M scores: masking one concept's channels moves every concept's score
                    logp = concept_scores(emb, text, scale, bias).log_softmax(dim=-1)
                    values = logp.gather(-1, ids[None, :, None, None].expand(b, m, k_l + 1, 1))[..., 0].exp()
                else:
                    values = (F.normalize(emb, dim=-1) * text[ids][None, :, None, :]).sum(dim=-1) * scale + bias
                    if score == "sigmoid":
                        values = values.sigmoid()
                parts.append(_drops(values, relative))
            curves.append(torch.cat(parts, dim=1))
            offset += c
    return curves


def association_scores(
    translator: nn.Module,
    z_list: Sequence[Tensor],
    text_emb: Tensor,
    betas: Sequence[Tensor],
    k: int = DEFAULT_TOP_K,
    fill: Sequence[Tensor | None] | None = None,
    score: Score = "softmax",
    relative: bool = True,
    rule: Rule = "right",
    concepts: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Association score (B, M', L) of every layer for every concept: the area under its
    `masking_curves` (same arguments) by `curve_area(rule)`."""
    curves = masking_curves(translator, z_list, text_emb, betas, k, fill, score, relative, concepts, chunk)
    return torch.stack([curve_area(c, rule) for c in curves], dim=-1)


def best_layer(scores: Tensor) -> Tensor:
    """Index (B, M) of the layer with the highest association score (B, M, L)."""
    return scores.argmax(dim=-1)


def candidate_layers(scores: Tensor, n: int = 4) -> Tensor:
    """The n (at most L) layers with the highest association scores, best first: (B, M, n)."""
    return scores.topk(min(n, scores.shape[-1]), dim=-1).indices


def class_masking_curves(
    tail_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    importance: Tensor,
    target: Tensor,
    k: int = DEFAULT_TOP_K,
    fill: Fill = None,
    relative: bool = True,
    prob: Literal["softmax", "logit"] = "softmax",
    chunk: int | None = None,
) -> Tensor:
    """Drop curves (B, M, K+1) of the class score as each concept's top channels are masked.

    tail_fn: the backbone from this layer on, (N, C[, H, W]) -> logits (N, classes); for a layer
    that feeds global average pooling and the classifier directly, pass pooled z (B, C) and the
    classifier. x: the layer's pooled features (B, C) or activation maps (B, C, H, W).
    importance: (B, M, C), e.g. `channel_importance` at each concept's chosen layer. target:
    class index per image (B,). fill: None (the paper's m^l: the image's mean over channels of
    the pooled features; a masked map becomes that constant), per-channel values (C,) / (B, C),
    or "spatial" (maps only: a masked channel's map becomes its own spatial mean — the authors'
    masking before the last layer, which leaves z^l unchanged). prob: "softmax" (p^c, default)
    or the raw logit. chunk: concepts per tail call (default all: one call of B*M*(K+1) inputs).
    """
    _check_k(k)
    if x.ndim not in (2, 4):
        raise ValueError(f"x must be pooled features (B, C) or maps (B, C, H, W); got {tuple(x.shape)}")
    b, c = x.shape[:2]
    if importance.ndim != 3 or importance.shape[0] != b or importance.shape[2] != c:
        raise ValueError(f"importance must have shape ({b}, M, {c}); got {tuple(importance.shape)}")
    if prob not in ("softmax", "logit"):
        raise ValueError(f"prob must be 'softmax' or 'logit'; got {prob!r}")
    k = min(k, c)
    spatial = (...,) + (None,) * (x.ndim - 2)  # broadcast per-channel values over a map's pixels
    if isinstance(fill, str):
        if fill != "spatial" or x.ndim != 4:
            raise ValueError(f"fill='spatial' needs maps (B, C, H, W) (pooled features would not change); got {fill!r}, {tuple(x.shape)}")
        filled = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        pooled = x if x.ndim == 2 else x.mean(dim=(2, 3))
        filled = _channel_fill(pooled, fill)[spatial].expand_as(x)
    target = target.to(x.device)
    m = importance.shape[1]
    step = m if chunk is None else chunk
    parts = []
    with torch.no_grad():
        for start in range(0, m, step):
            mask = _replaced(_rank_positions(importance[:, start : start + step], k), k)  # (B, m, K+1, C)
            mm = mask.shape[1]
            inputs = torch.where(mask[spatial], filled[:, None, None], x[:, None, None])  # (B, m, K+1, C, ...)
            logits = tail_fn(inputs.reshape(-1, *x.shape[1:])).reshape(b, mm, k + 1, -1)
            scores = logits.softmax(dim=-1) if prob == "softmax" else logits
            values = scores.gather(-1, target[:, None, None, None].expand(b, mm, k + 1, 1))[..., 0]
            parts.append(_drops(values, relative))
    return torch.cat(parts, dim=1)


def class_contribution(
    tail_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    importance: Tensor,
    target: Tensor,
    k: int = DEFAULT_TOP_K,
    fill: Fill = None,
    relative: bool = True,
    prob: Literal["softmax", "logit"] = "softmax",
    rule: Rule = "right",
    chunk: int | None = None,
) -> Tensor:
    """Contribution (B, M) of each concept to the target class: the area under its
    `class_masking_curves` (same arguments) by `curve_area(rule)`; negative when masking the
    concept's channels raises the class score."""
    return curve_area(class_masking_curves(tail_fn, x, importance, target, k, fill, relative, prob, chunk), rule)
