"""Presence and logit contribution of every SAE concept, for a batch of images (FaCT §3.2).

The SAE is spliced into the layer: the network's tail (`head`) sees x_hat_p = W_dec z_p at every
position p instead of the layer's output. With g_p = dy_c / dx_hat_p,

    presence      P_j = sum_p z_pj
    contribution  C_j = sum_p z_pj (d_j . g_p)         (d_j: atom j, a decoder column)

Since x_hat_p = sum_j z_pj d_j, sum_j C_j = sum_p x_hat_p . g_p exactly, for any head. When the head
is dynamic linear, y_c = W_c(x_hat) . x_hat + b with W_c's dependence on x_hat *detached*, so
g_p = W_c,p and sum_j C_j = y_c - b: the contributions are complete and faithful.

B-cos heads. A B-cos layer (bcos.modules.BcosConv2d, b=2) computes |cos| (w . x), which is positively
homogeneous, so x . grad = y holds even without detaching (Euler) -- the totals agree either way --
but only with the dynamic scale |cos| detached does g_p equal the layer's own dynamic linear map W(x)
and so split y among positions and concepts faithfully. bcos turns that on per module through
`set_explanation_mode(True)` (class DetachableModule; models with BcosUtilMixin wrap it in the
`model.explanation_mode()` context manager, and `bcos.common.explanation_mode(module)` works for any
nn.Module such as a tail slice). `concept_contributions` does it for you by default: it enters
explanation mode on every sub-module of `head` that has `set_explanation_mode` and restores each
module's previous state afterwards (no bcos import). Also remove the head's logit bias yourself
(B-cos LogitLayer adds `logit_bias` to every logit): compare `explained` with y_c - bias. For a head
that is not dynamic linear (BatchNorm with batch statistics, biases, max-pool over non-B-cos
features) the C_j are gradient x input shares of `explained`, which then differs from y_c.

Memory: z, dy/dx_hat projected on the atoms, and their product are (B, H*W, J) each; choose B so
that fits (B=64, 14x14, J=16384 in float32: 0.8 GB per tensor).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lib.methods.fact.sae import BiasFreeTopKSAE

__all__ = ["ConceptContributions", "concept_contributions", "detached_dynamic_weights", "splice"]


class ConceptContributions(NamedTuple):
    """Per image b: `presence`/`contributions` (B, J); `logits` (B, K) of the spliced model; `target`
    (B,) the explained class; `target_logit` (B,) y_c; `explained` (B,) sum_p x_hat_p . dy_c/dx_hat_p,
    which sum_j C_j equals; `error` (B, H, W) ||A_p - x_hat_p||, the SAE's reconstruction error;
    `grad` (B, C, H, W) dy_c/dx_hat: (grad * x_hat).sum(1) is where the explained logit comes from, per
    position (sum_j C_pj), and the same with the decoding of a subset of the codes, that subset's share."""

    presence: Tensor
    contributions: Tensor
    logits: Tensor
    target: Tensor
    target_logit: Tensor
    explained: Tensor
    error: Tensor
    grad: Tensor


@contextmanager
def detached_dynamic_weights(module: nn.Module, active: bool = True) -> Iterator[None]:
    """Put every sub-module with `set_explanation_mode` (bcos's DetachableModule API) into explanation
    mode, restoring each one's previous state on exit. A no-op for modules without any."""
    modules = [m for m in module.modules() if hasattr(m, "set_explanation_mode")] if active else []
    previous = [bool(getattr(m, "is_in_explanation_mode", False)) for m in modules]
    for m in modules:
        m.set_explanation_mode(True)
    try:
        yield
    finally:
        for m, state in zip(modules, previous, strict=True):
            m.set_explanation_mode(state)


def splice(sae: BiasFreeTopKSAE, feats: Tensor) -> tuple[Tensor, Tensor]:
    """Codes z (B, H*W, J) and reconstruction x_hat (B, C, H, W) of a feature map (B, C, H, W)."""
    if feats.ndim != 4:
        raise ValueError(f"feats must be (B, C, H, W), got {tuple(feats.shape)}")
    b, c, h, w = feats.shape
    vectors = feats.permute(0, 2, 3, 1).reshape(b * h * w, c)
    z = sae.encode(vectors)
    x_hat = sae.decode(z).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return z.reshape(b, h * w, -1), x_hat


def concept_contributions(
    head: nn.Module,
    sae: BiasFreeTopKSAE,
    feats: Tensor,
    target: Tensor | None = None,
    explanation_mode: bool = True,
) -> ConceptContributions:
    """Presence and contributions of all J concepts to logit `target` (default: argmax of the spliced
    logits) for feature maps `feats` (B, C, H, W) of the layer the SAE was trained on.

    `head` maps the layer's (B, C, H, W) to logits (B, K) and should be in eval mode. One backward
    for the whole batch (of the sum of the selected logits: images do not interact in eval mode), no
    per-concept or per-image work. With `explanation_mode`, B-cos-style dynamic weights in `head` are
    detached (see the module docstring)."""
    feats = feats.detach()
    with torch.no_grad():
        z, x_hat = splice(sae, feats)
    b, c, h, w = feats.shape
    x_hat = x_hat.contiguous().requires_grad_(True)
    with torch.enable_grad(), detached_dynamic_weights(head, explanation_mode):
        logits = head(x_hat)
        if logits.ndim != 2 or logits.shape[0] != b:
            raise ValueError(f"head must return logits (B, K), got {tuple(logits.shape)}")
        target = logits.detach().argmax(dim=1) if target is None else target.to(logits.device).long()
        selected = logits.gather(1, target[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(selected.sum(), x_hat)

    with torch.no_grad():
        g = grad.permute(0, 2, 3, 1).reshape(b, h * w, c)  # dy_c / dx_hat_p
        along_atoms = g @ sae.atoms  # (B, HW, J): d_j . g_p for every concept at once
        contributions = (z * along_atoms).sum(dim=1)
        presence = z.sum(dim=1)
        explained = (grad * x_hat).flatten(1).sum(dim=1)
        error = (feats - x_hat).norm(dim=1)
    return ConceptContributions(
        presence=presence,
        contributions=contributions,
        logits=logits.detach(),
        target=target,
        target_logit=selected.detach(),
        explained=explained,
        error=error,
        grad=grad,
    )
