"""CE-FAM concept regions: Grad-CAM of every concept score at every layer (paper eq. 11-12).

R^l_t = ReLU(sum_k beta^t_k A^l_k), beta^t_k = (1/(H_l W_l)) sum_ij dS^t / dA^l_k(i, j).

Two ways to get the betas:

* `concept_betas` — through the translator only. If A^l reaches the scores only through its
  global average pool z^l, then dS^t/dA^l_k(i, j) = dS^t/dz^l_k / (H_l W_l) at every (i, j), and
  its mean over space is beta^t_k = dS^t/dz^l_k / (H_l W_l). One Jacobian of the translator per
  image then serves every concept and layer. This holds exactly for the last layer, and for
  every layer when the maps are treated as separate inputs (the translator branch alone).
* `concept_betas_total` — through the backbone as well. In a backbone, A^l also feeds layer l+1,
  whose pool also enters z_cat; the authors' code (utils/cefam.py, BaseCAM: gradient hooks on the
  layer outputs, one `backward` per (image, concept)) therefore takes the *total* derivative,
  which adds the paths through the later layers for every layer but the last. This function
  computes that total exactly with min(M, D, C) backward rows per batch instead of M: every
  concept's beta is a matmul of dS^t/dh (or dS^t/dz_cat) with the spatially summed Jacobian of h
  (or z_cat) w.r.t. the maps, when that is smaller than M. Given the backbone and its input, it
  can instead go forward (`concept_betas_channels`): sum_ij dS/dA^l_k(i, j) is the derivative of
  S when a constant is added to every pixel of channel k, one JVP per channel of every layer but
  the last, each giving all M concepts at once; `total_basis` picks the cheaper way.

Compare its speed with a plain loop (one forward, one backward per concept, retain_graph, no copies):
benchmarks/regions.py. The reference code also deep-copies both models per (image, concept);
that cost is not ours to claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap

from lib.methods.cefam.translator import concept_scores
from lib.models.layers import resolve_layer

__all__ = [
    "concept_betas",
    "concept_betas_channels",
    "concept_betas_total",
    "concept_regions",
    "default_tangent_chunk",
    "default_total_chunk",
    "pool_features",
    "total_basis",
]


def pool_features(feature_maps: Sequence[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Global average pools z^l (B, C_l) and pixel counts H_l*W_l of activation maps (B, C_l, H_l, W_l)."""
    for a in feature_maps:
        if a.ndim != 4:
            raise ValueError(f"feature maps must be (B, C, H, W); got {tuple(a.shape)}")
    return [a.mean(dim=(2, 3)) for a in feature_maps], [a.shape[2] * a.shape[3] for a in feature_maps]


def _pixels(hw: int | Sequence[int]) -> int:
    n = hw if isinstance(hw, int) else math.prod(hw)
    if n < 1:
        raise ValueError(f"a layer's spatial size must be >= 1 pixel; got {hw}")
    return n


def _score_params(translator: nn.Module) -> tuple[Tensor | float, Tensor | float]:
    # the Translator keeps the VLM's logit scale and bias as buffers; other modules get CLIP's
    return getattr(translator, "scale", 100.0), getattr(translator, "bias", 0.0)


def _cosine_grad(emb: Tensor, text: Tensor, scale: Tensor | float) -> Tensor:
    """d(scale * cos(h, t_m))/dh for embeddings (B, D) and unit text rows (M, D): (B, M, D).

    d<h/|h|, t>/dh = (t - <t, h^> h^) / |h|: the projection removes the radial direction, the
    one the cosine ignores.
    """
    norm = emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, 1)
    unit = emb / norm
    cos = unit @ text.T  # (B, M)
    return scale * (text[None] - cos[..., None] * unit[:, None]) / norm[..., None]


def concept_betas(
    translator: nn.Module,
    z_list: Sequence[Tensor],
    text_emb: Tensor,
    hw_list: Sequence[int | Sequence[int]],
    chunk_size: int | None = None,
) -> list[Tensor]:
    """Grad-CAM weights beta (B, M, C_l) of every concept for every layer, through the translator.

    z_list: pooled features z^l (B, C_l) in the translator's concatenation order; text_emb (M, D);
    hw_list: each layer's H_l*W_l (or (H_l, W_l)). One Jacobian per image, batched with
    torch.func: of the M scores w.r.t. z_cat when M <= D, else of the D embedding coordinates,
    composed with the derivative of the scaled cosine (which goes through the normalisation of
    h). chunk_size bounds jacrev's vectorised rows (memory). Returns detached float tensors on the
    inputs' device. Put the translator in eval mode (dropout, batch norm).
    """
    if len(z_list) != len(hw_list) or not z_list:
        raise ValueError(f"z_list and hw_list must be non-empty and of one length; got {len(z_list)} and {len(hw_list)}")
    z_cat = torch.cat(list(z_list), dim=1)
    text = F.normalize(text_emb.to(z_cat), dim=-1)
    scale, bias = _score_params(translator)
    m, d = text.shape

    def embed(z: Tensor) -> Tensor:  # one image (C,) -> (D,); modules may expect a batch dim
        return translator(z[None])[0]

    # the outer no_grad keeps autograd from recording w.r.t. the translator's parameters;
    # torch.func's transforms differentiate w.r.t. z regardless
    with torch.no_grad():
        if m <= d:
            grads = vmap(jacrev(lambda z: concept_scores(embed(z), text, scale, bias), chunk_size=chunk_size))(z_cat)
        else:
            jac = vmap(jacrev(embed, chunk_size=chunk_size))(z_cat)  # (B, D, C)
            grads = _cosine_grad(translator(z_cat), text, scale) @ jac  # (B, M, C)
    sizes = [z.shape[1] for z in z_list]
    return [g / _pixels(hw) for g, hw in zip(grads.split(sizes, dim=2), hw_list, strict=True)]


BASES = ("scores", "embedding", "pools", "channels")


def total_basis(n_concepts: int, embed_dim: int, n_channels: int, tangents: int | None = None) -> str:
    """Which way `concept_betas_total` goes: backward from the fewest rows of the M scores, the D
    embedding coordinates or the sum C of pooled channels, or — with `tangents` (the channels of
    every layer but the last; None when the backbone cannot be rerun) — forward, one JVP per such
    channel ("channels"). Ties: that order, so forward only when it needs strictly fewer passes.

    Passes are compared one to one: a JVP row only runs the network after its layer (none for
    the last), which on the CPU cost 0.6x (toy CNN) to 0.85x (toy B-cos) of a backward row
    (docs/benchmarks.md, "CE-FAM regions"), so the count errs towards the backward bases."""
    rows = {"scores": n_concepts, "embedding": embed_dim, "pools": n_channels}
    if tangents is not None:
        rows["channels"] = tangents
    return min(rows, key=rows.__getitem__)


def default_total_chunk(feature_maps: Sequence[Tensor]) -> int:
    """Rows per batched backward in `concept_betas_total`, sized for the maps' device.

    CPU: 1 — each row is one plain backward (retain_graph); batching rows with vmap does the same
    arithmetic and only adds memory traffic there. CUDA: as many rows as fit in a quarter of the
    free memory at about 3 gradient-sized buffers per row (4..256)."""
    device = feature_maps[0].device
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    per_row = 3 * sum(a.numel() * a.element_size() for a in feature_maps)
    return int(min(256, max(4, free // 4 // max(per_row, 1))))


def default_tangent_chunk(feature_maps: Sequence[Tensor]) -> int:
    """Tangent rows per vmapped JVP in `concept_betas_channels`, sized for the maps' device.

    A row carries one perturbed copy of the network after its layer for all B images: about 3
    map-sized buffers at a time. CPU: as many rows as fit in 512 MiB (larger vmaps gained nothing
    on the toy CNN past 32 rows, and the part before the layer runs once per chunk); CUDA: a
    quarter of the free memory (4..256)."""
    per_row = max(3 * sum(a.numel() * a.element_size() for a in feature_maps), 1)
    device = feature_maps[0].device
    if device.type != "cuda":
        return int(min(256, max(1, (512 << 20) // per_row)))
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(256, max(4, free // 4 // per_row)))


def _spatial_jacobian(out: Tensor, feature_maps: Sequence[Tensor], chunk_size: int) -> list[Tensor]:
    """(1/(H_l W_l)) sum_ij d out[b, r] / dA^l[b, :, i, j] as (B, R, C_l) per layer, for outputs
    out (B, R) of the maps: R one-hot cotangents, `chunk_size` per backward (batched with
    is_grads_batched when > 1). Each gradient is averaged over space at once, so only
    (rows, B, C_l) is kept."""
    rows = out.shape[1]
    parts: list[list[Tensor]] = [[] for _ in feature_maps]
    for start in range(0, rows, chunk_size):
        r = min(chunk_size, rows - start)
        cot = torch.zeros(r, *out.shape, dtype=out.dtype, device=out.device)
        index = torch.arange(r, device=out.device)
        cot[index, :, start + index] = 1.0  # cotangent i selects output row start + i of every image
        if r == 1:
            grads = [g[None] for g in torch.autograd.grad(out, list(feature_maps), grad_outputs=cot[0], retain_graph=True)]
        else:
            grads = torch.autograd.grad(out, list(feature_maps), grad_outputs=cot, retain_graph=True, is_grads_batched=True)
        for part, g in zip(parts, grads, strict=True):
            part.append(g.mean(dim=(3, 4)))  # (r, B, C_l)
    return [torch.cat(p).permute(1, 0, 2) for p in parts]


class _Stop(Exception):
    """Raised from a hook once the last tapped layer has run: the rest of the network is not needed."""


def _later_pools(model: nn.Module, x: Tensor, layers: Sequence[str], layer: int) -> Callable[[Tensor], Tensor]:
    """eps (C_l,) -> the pools (B, sum of C_l' for l' > layer) of the later tapped layers when eps
    is added to every pixel of layer `layer`'s output (the network runs up to the last tapped layer)."""
    modules = [resolve_layer(model, name) for name in layers]

    def run(eps: Tensor) -> Tensor:
        pools: list[Tensor] = []

        def perturb(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            if not isinstance(out, Tensor) or out.ndim != 4:
                raise ValueError(f"layer {layers[layer]!r} returns no (B, C, H, W) map; forward-mode betas need maps")
            return out + eps[:, None, None]

        def pool(module: nn.Module, args: tuple, out: Tensor) -> None:
            pools.append(out.mean(dim=(2, 3)))  # pooled at once: later in-place ops cannot change it
            if len(pools) == len(modules) - 1 - layer:
                raise _Stop

        handles = [modules[layer].register_forward_hook(perturb)]
        handles += [m.register_forward_hook(pool) for m in modules[layer + 1 :]]
        try:
            model(x)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat(pools, dim=1)

    return run


def _forward_jacobian(run: Callable[[Tensor], Tensor], a: Tensor, chunk_size: int) -> Tensor:
    """d run(eps)/d eps at eps = 0 for eps (C_l,) shaped like map a's channels, as (B, R, C_l):
    one-hot tangents, `chunk_size` per vmapped JVP."""
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    zero = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)

    def column(tangent: Tensor) -> Tensor:
        return jvp(run, (zero,), (tangent,))[1]

    cols = [vmap(column)(eye[start : start + chunk_size]) for start in range(0, a.shape[1], chunk_size)]  # (rows, B, R)
    return torch.cat(cols).permute(1, 2, 0)


def concept_betas_channels(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str],
    translator: nn.Module,
    feature_maps: Sequence[Tensor],
    text_emb: Tensor,
    chunk_size: int | None = None,
) -> list[Tensor]:
    """`concept_betas_total`'s betas (B, M, C_l) in forward mode: cost independent of M.

    beta^t_l = (1/(H_l W_l)) d S^t(A^l + eps 1)/d eps: S depends on eps only through z_cat, whose
    own block z^l moves by eps itself and whose later blocks z^{l'} (l' > l) move through the
    backbone. So beta_l = (dS/dz^l + dS/dz_later . J_l) / (H_l W_l), with dS/dz_cat the
    translator's Jacobian (`concept_betas` on 1-pixel layers) and J_l (C_later x C_l) one JVP of
    the network after layer l per channel (a hook adds eps to the layer's output), batched with
    vmap over one-hot tangents, `chunk_size` at a time (default `default_tangent_chunk`). The
    network before layer l carries no tangent, so vmap runs it once per chunk; the last layer
    needs no JVP. model: in eval mode; layers: the translator's (z_cat order), each returning a
    (B, C, H, W) map; feature_maps: their maps from model(x) (detached is fine). Returns
    detached tensors.
    """
    if len(layers) != len(feature_maps) or not layers:
        raise ValueError(f"layers and feature_maps must be non-empty and of one length; got {len(layers)} and {len(feature_maps)}")
    chunk_size = default_tangent_chunk(feature_maps) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    maps = [a.detach() for a in feature_maps]
    z_list, hw = pool_features(maps)
    sizes = [a.shape[1] for a in maps]
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    with torch.no_grad():  # torch.func differentiates w.r.t. eps regardless; no graph for the parameters
        outer = torch.cat(concept_betas(translator, z_list, text_emb, [1] * len(z_list)), dim=2)  # dS/dz_cat (B, M, C)
        betas = []
        for layer, (a, end) in enumerate(zip(maps, ends, strict=True)):
            beta = outer[:, :, end - a.shape[1] : end]
            if layer < len(maps) - 1:
                jac = _forward_jacobian(_later_pools(model, x.detach(), layers, layer), a, chunk_size)
                beta = beta + outer[:, :, end:] @ jac.to(outer.dtype)
            betas.append((beta / hw[layer]).detach())
    return betas


def concept_betas_total(
    translator: nn.Module,
    feature_maps: Sequence[Tensor],
    text_emb: Tensor,
    chunk_size: int | None = None,
    *,
    backbone: tuple[nn.Module, Tensor, Sequence[str]] | None = None,
) -> list[Tensor]:
    """Grad-CAM weights beta (B, M, C_l) with the total derivative through the backbone.

    feature_maps: the layers' activation maps (B, C_l, H_l, W_l) from one forward pass of the
    backbone, still in its autograd graph (A^{l+1} computed from A^l; run the backbone with the
    input or the parameters requiring grad and without no_grad). They are pooled and concatenated
    in the given order and fed to the translator here.

    Exact by the chain rule, with as few backward passes as the shapes allow: S^t depends on the
    maps only through z_cat (sum C channels) and h = translator(z_cat) (D), so
    beta^t = dS^t/dh . J_h = dS^t/dz_cat . J_z, with J_h (D x C_l) and J_z (C x C_l) the spatial
    means of dh/dA^l and dz_cat/dA^l. `total_basis` picks the fewest rows R = min(M, D, C): the M
    scores themselves, or J_h (then every concept's beta is one matmul with the cosine's
    derivative), or J_z (with the translator's Jacobian dS/dz_cat, `concept_betas`). R one-hot
    cotangents go back in chunks of `chunk_size` rows (default `default_total_chunk`); peak memory
    is about chunk_size * B * sum_l C_l H_l W_l gradient values. Equals `concept_betas` when the
    maps do not feed each other.

    backbone: (model, x, layer names) that gave the maps, each layer returning a (B, C, H, W)
    map. With it, `total_basis` may pick forward mode instead — `concept_betas_channels`, one
    JVP per channel of every layer but the last — when that needs fewer passes than R (the maps
    then need no graph; chunk_size is its tangent rows per vmap). Returns detached tensors.
    """
    if not feature_maps:
        raise ValueError("feature_maps is empty")
    chunk_given = chunk_size
    z_list, _ = pool_features(feature_maps)
    text = F.normalize(text_emb.to(z_list[0]), dim=-1)  # (M, D): D is the translator's width
    tangents = None if backbone is None else sum(a.shape[1] for a in feature_maps[:-1])
    basis = total_basis(text.shape[0], text.shape[1], sum(z.shape[1] for z in z_list), tangents)
    if basis == "channels":
        model, x, layers = backbone  # type: ignore[misc]  # tangents is set only with a backbone
        return concept_betas_channels(model, x, layers, translator, feature_maps, text_emb, chunk_given)
    if not all(a.requires_grad for a in feature_maps):
        raise ValueError("feature_maps must be in an autograd graph (requires_grad); run the backbone with grad enabled")
    chunk_size = default_total_chunk(feature_maps) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    with torch.enable_grad():
        z_cat = torch.cat(z_list, dim=1)
        emb = translator(z_cat)
        scale, bias = _score_params(translator)
        out = {"scores": lambda: concept_scores(emb, text, scale, bias), "embedding": lambda: emb, "pools": lambda: z_cat}[basis]()
        jac = _spatial_jacobian(out, feature_maps, chunk_size)  # (B, R, C_l)
    if basis == "scores":
        return [j.detach() for j in jac]
    if basis == "embedding":
        outer = _cosine_grad(emb.detach(), text, scale)  # (B, M, D)
    else:  # dS/dz_cat through the translator alone: its "betas" for 1-pixel layers
        outer = torch.cat(concept_betas(translator, [z.detach() for z in z_list], text_emb, [1] * len(z_list)), dim=2)
    return [(outer @ j).detach() for j in jac]


def concept_regions(betas: Sequence[Tensor], feature_maps: Sequence[Tensor]) -> list[Tensor]:
    """Concept regions R^l = ReLU(sum_k beta_k A^l_k) (B, M, H_l, W_l) for all concepts and layers.

    betas: (B, M, C_l) per layer; feature_maps: (B, C_l, H_l, W_l) per layer (cast to the betas'
    dtype: stores hold fp16). Memory is B*M*H_l*W_l per layer: chunk images or concepts upstream.
    """
    if len(betas) != len(feature_maps):
        raise ValueError(f"betas and feature_maps must have one entry per layer; got {len(betas)} and {len(feature_maps)}")
    return [
        torch.einsum("bmk,bkhw->bmhw", beta, a.to(beta.dtype)).relu()
        for beta, a in zip(betas, feature_maps, strict=True)
    ]
