"""A reference for FaCT's per-concept contributions, computed without autograd: the tail frozen at x̂.

A dynamic-linear tail computes y = W(x̂) x̂ + b. Freeze it at x̂: run it once on x̂ and record each
dynamic quantity (a B-cos layer's dynamic scale |cos| and MaxOut choice, a ReLU's gate); with those
fixed the tail is the affine map f(x) = W(x̂) x + b. Then concept j's contribution to logit c is

    C_j^ref = f(x̂_j)_c - f(0)_c,      x̂_j = (z_pj d_j)_p, the decoding of concept j alone,

which `concept_contributions` (one backward in explanation mode) must equal: its C_j are
sum_p z_pj d_j . dy_c/dx̂_p, and in explanation mode dy_c/dx̂ = W(x̂). With explanation mode off the
gradient also differentiates the dynamic scale, the C_j move, and this check fails -- unlike
sum_j C_j = y_c - b, which holds either way on a positively homogeneous tail (Euler).

Frozen here: bcos's BcosConv2d (any b, MaxOut) and torch's ReLU. Modules that are linear in eval mode
(BatchNorm and bcos's uncentered BatchNorm with running statistics, pooling by averaging, conv/linear
layers, bcos's LogitLayer) run as they are. A tail with any other bcos DetachableModule (dynamic
norms, attention) has no frozen form here: `frozen_contributions` raises NotImplementedError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from bcos.modules.bcosconv2d import BcosConv2d
from bcos.modules.common import DetachableModule
from bcos.modules.norms.uncentered_norms import BatchNormUncentered2d
from torch import Tensor, nn

__all__ = ["frozen_contributions"]

_LINEAR_IN_EVAL = (BatchNormUncentered2d,)


def _bcos_record(module: BcosConv2d, x: Tensor) -> tuple[Tensor, tuple[Tensor | None, Tensor]]:
    """The layer's output on x and what makes it dynamic: (MaxOut index or None, dynamic scale)."""
    out = module.linear(x)
    index = None
    if module.max_out > 1:
        out = out.unflatten(1, (module.out_channels, module.max_out))
        index = out.argmax(dim=2, keepdim=True)
        out = out.gather(2, index).squeeze(2)
    if module.b == 1:
        return out, (index, torch.ones_like(out))
    norm = module.calc_patch_norms(x)
    scale = out.abs() / norm if module.b == 2 else ((out / norm).abs() + 1e-6).pow(module.b - 1)
    return scale * out, (index, scale)


def _bcos_replay(module: BcosConv2d, x: Tensor, frozen: tuple[Tensor | None, Tensor], copies: int) -> Tensor:
    index, scale = frozen
    out = module.linear(x)
    if index is not None:
        out = out.unflatten(1, (module.out_channels, module.max_out)).gather(2, index.repeat(copies, 1, 1, 1, 1)).squeeze(2)
    return scale.repeat(copies, 1, 1, 1) * out


def _relu_record(module: nn.ReLU, x: Tensor) -> tuple[Tensor, Tensor]:
    gate = (x > 0).to(x.dtype)
    return x * gate, gate


def _relu_replay(module: nn.ReLU, x: Tensor, gate: Tensor, copies: int) -> Tensor:
    return x * gate.repeat(copies, *([1] * (gate.ndim - 1)))


_FROZEN: dict[type, tuple[Callable, Callable]] = {BcosConv2d: (_bcos_record, _bcos_replay), nn.ReLU: (_relu_record, _relu_replay)}


def _frozen_kind(module: nn.Module) -> tuple[Callable, Callable] | None:
    for kind, functions in _FROZEN.items():
        if isinstance(module, kind):
            return functions
    if isinstance(module, DetachableModule) and not (isinstance(module, _LINEAR_IN_EVAL) and not module.training):
        raise NotImplementedError(f"no frozen form of {type(module).__name__} (lib/methods/fact/completeness.py)")
    return None


@contextmanager
def _patched(tail: nn.Module, make: Callable[[nn.Module, Callable, Callable], Callable]) -> Iterator[None]:
    """Every freezable module's forward replaced by make(module, record, replay), restored on exit."""
    patched = []
    for module in tail.modules():
        kind = _frozen_kind(module)
        if kind is not None:
            module.forward = make(module, *kind)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


@torch.no_grad()
def frozen_contributions(tail: nn.Module, x_hat: Tensor, codes: Tensor, atoms: Tensor, target: Tensor, chunk: int = 4096) -> Tensor:
    """C_j^ref (B, J) of every concept to logit target[b] (module doc), in the tail's dtype.

    tail: the layer's (B, C, H, W) -> logits (B, K), eval mode; x_hat (B, C, H, W) the spliced
    reconstruction; codes (B, H*W, J) its codes; atoms (C, J) the decoder's columns. Concepts go
    through the frozen tail `chunk` // B at a time."""
    dtype = next(tail.parameters()).dtype
    x_hat, codes, atoms = x_hat.to(dtype), codes.to(dtype), atoms.to(dtype)
    b, c, h, w = x_hat.shape
    records: dict[int, list] = {}

    def record(module: nn.Module, record_fn: Callable, _: Callable) -> Callable:
        def forward(x: Tensor) -> Tensor:
            out, frozen = record_fn(module, x)
            records.setdefault(id(module), []).append(frozen)
            return out
        return forward

    with _patched(tail, record):
        tail(x_hat)

    def replay_with(copies: int) -> Callable:
        calls: dict[int, int] = {}

        def make(module: nn.Module, _: Callable, replay_fn: Callable) -> Callable:
            def forward(x: Tensor) -> Tensor:
                n = calls.get(id(module), 0)
                calls[id(module)] = n + 1
                return replay_fn(module, x, records[id(module)][n], copies)
            return forward
        return make

    def frozen(x: Tensor, copies: int) -> Tensor:
        with _patched(tail, replay_with(copies)):
            return tail(x)

    rows = torch.arange(b, device=x_hat.device)
    offset = frozen(torch.zeros_like(x_hat), 1)[rows, target]
    per_chunk = max(1, chunk // b)
    out = []
    for start in range(0, codes.shape[2], per_chunk):
        js = torch.arange(start, min(start + per_chunk, codes.shape[2]), device=codes.device)
        # x̂_j, concept-major: (J_chunk * B, C, H, W)
        alone = torch.einsum("bpj,cj->jbcp", codes[:, :, js], atoms[:, js]).reshape(len(js) * b, c, h, w)
        logits = frozen(alone, len(js)).reshape(len(js), b, -1)
        out.append(logits[:, rows, target].T - offset[:, None])
    return torch.cat(out, dim=1)
