"""Bias-free TopK sparse autoencoder (FaCT §3; TopK SAE of Gao et al. 2024 without any bias).

    z = TopK(ReLU(W_enc x), k)        x_hat = W_dec z

No bias anywhere, so the map x -> (z, x_hat) is positively homogeneous (z(t x) = t z(x) for t > 0)
and x_hat is *linear in z*: a concept's share of the reconstruction, and hence of a logit of a
dynamic-linear network downstream, is exactly z_j d_j. That is why FaCT drops the biases.

Scaling. Training works on x / s with one scalar s = sqrt(mean ||x||^2) (a buffer, estimated by
`fit_scale`), as FaCT does (dictionary_learning's norm factor). Because of the homogeneity above,
the scale cancels in `encode`/`decode`: users pass and get back unscaled feature vectors, and codes
are in the units of the input (decode(z) = W_dec z, atoms unit norm, so z_j is the length of the
atom's share of x_hat). Only `loss` divides by s.

Loss (FaCT's, i.e. dictionary_learning's TopKTrainer): mse = sum_n ||x_n / s - x_hat_n||^2 / N, the
mean squared error per vector of the scaled inputs (not normalised by the batch's energy: since s
makes the mean ||x / s||^2 one over the training set, mse is about 1 - fve), plus aux_coef times the
aux-k loss.

Dead latents. `tokens_since_fired` counts, per latent, the training vectors seen since it was last
*chosen by the top-k* (FaCT and dictionary_learning: a top-k pick with value 0 counts as firing);
a latent is dead once that reaches `dead_after` (FaCT: half an epoch of training vectors). The
auxiliary loss lets the `aux_k` largest ReLU pre-activations among dead latents reconstruct the
residual (normalised like OpenAI's reference: by the residual's variance), which revives them.

Under torchrun, `loss(x, ranks=...)` takes this rank's part of the batch and sums over the global
batch (lib.core.distributed: the mse's sum and count, the aux normalisation and the dead-latent
counts), so DDP training equals one process on the concatenated batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.core.distributed import Ranks, reduce_, reduce_sum

__all__ = ["BiasFreeTopKSAE", "SAELoss", "TopKCodes"]

_EPS = 1e-12


class TopKCodes(NamedTuple):
    """Codes of N vectors: `dense` (N, J) and the same as `values`/`indices` (N, k)."""

    dense: Tensor
    values: Tensor
    indices: Tensor


class SAELoss(NamedTuple):
    """One training forward: `loss` (with graph) = `mse` + aux_coef * `aux`; the rest detached."""

    loss: Tensor
    mse: Tensor
    aux: Tensor
    dead_fraction: Tensor


class BiasFreeTopKSAE(nn.Module):
    """Bias-free TopK SAE over C-dimensional vectors with J latents.

    Parameters live in two bias-free `nn.Linear`s named like FaCT's released checkpoints:
    `encoder.weight` (J, C) and `decoder.weight` (C, J), whose columns are the unit-norm atoms d_j.
    """

    def __init__(
        self,
        in_dim: int,
        n_concepts: int,
        k: int,
        *,
        aux_k: int = 256,
        aux_coef: float = 1 / 32,
        dead_after: int = 10_000_000,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("n_concepts", n_concepts), ("k", k), ("dead_after", dead_after)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if k > n_concepts:
            raise ValueError(f"k ({k}) must be <= n_concepts ({n_concepts})")
        if aux_k < 0 or aux_coef < 0:
            raise ValueError(f"aux_k and aux_coef must be >= 0, got {aux_k}, {aux_coef}")
        self.in_dim, self.n_concepts, self.k = in_dim, n_concepts, k
        self.aux_k, self.aux_coef, self.dead_after = aux_k, aux_coef, dead_after

        self.encoder = nn.Linear(in_dim, n_concepts, bias=False)
        self.decoder = nn.Linear(n_concepts, in_dim, bias=False)
        with torch.no_grad():
            atoms = torch.randn(in_dim, n_concepts, generator=generator)
            self.decoder.weight.copy_(atoms)
            self.renormalise_decoder()
            # Encoder starts as the decoder's transpose (Gao et al.): each latent first responds to
            # its own atom, which avoids many latents dying at step 0.
            self.encoder.weight.copy_(self.decoder.weight.T)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(n_concepts, dtype=torch.long))

    # ---------------------------------------------------------------------------------------------
    # Construction helpers
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able) to rebuild this model before loading its state."""
        return {
            "in_dim": self.in_dim, "n_concepts": self.n_concepts, "k": self.k,
            "aux_k": self.aux_k, "aux_coef": self.aux_coef, "dead_after": self.dead_after,
        }

    @classmethod
    def from_fact_state_dict(cls, state: Mapping[str, Tensor], k: int | None = None) -> BiasFreeTopKSAE:
        """Load a checkpoint released by the FaCT authors (dictionary_learning's AutoEncoderTopK with
        biases removed: keys encoder.weight, decoder.weight, k, threshold). Scale is set to 1, which is
        exact for inference (it cancels, see the module docstring)."""
        bias_keys = [key for key in state if "bias" in key or key == "b_dec"]
        if bias_keys:
            raise ValueError(f"not a bias-free checkpoint: has {bias_keys}")
        n_concepts, in_dim = state["encoder.weight"].shape
        if k is None:
            if "k" not in state:
                raise ValueError("checkpoint has no 'k'; pass k=")
            k = int(state["k"])
        model = cls(in_dim, n_concepts, k)
        model.load_state_dict(
            {"encoder.weight": state["encoder.weight"], "decoder.weight": state["decoder.weight"]}, strict=False
        )
        return model

    @property
    def atoms(self) -> Tensor:
        """The dictionary, (C, J): column j is atom d_j."""
        return self.decoder.weight

    # ---------------------------------------------------------------------------------------------
    # Inference (unscaled units)
    def pre_activations(self, x: Tensor) -> Tensor:
        """ReLU(W_enc x), (N, J)."""
        return F.relu(self.encoder(x))

    def encode_topk(self, x: Tensor) -> TopKCodes:
        """Dense and sparse codes of x (N, C). Where fewer than k pre-activations are positive, some
        of the k (values, indices) pairs hold zeros."""
        values, indices = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)
        dense = torch.zeros(x.shape[0], self.n_concepts, dtype=values.dtype, device=values.device)
        return TopKCodes(dense.scatter(-1, indices, values), values, indices)

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes z (N, J) of unscaled vectors x (N, C)."""
        return self.encode_topk(x).dense

    def decode(self, z: Tensor) -> Tensor:
        """x_hat = W_dec z for dense codes z (N, J)."""
        return self.decoder(z)

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """x_hat from (values, indices) (N, k): sums k atoms per row without a dense (N, J) code."""
        return F.embedding_bag(indices, self.decoder.weight.T, per_sample_weights=values, mode="sum")

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction x_hat of x (N, C)."""
        codes = self.encode_topk(x)
        return self.decode_sparse(codes.values, codes.indices)

    # ---------------------------------------------------------------------------------------------
    # Training
    @torch.no_grad()
    def fit_scale(self, batches: Iterable[Tensor]) -> float:
        """Set `scale` = sqrt(mean ||x||^2) over all vectors of `batches` ((B, C) each), streaming.
        Sums in float64 on the batches' device; one host sync at the end."""
        total: Tensor | None = None
        count = 0
        for batch in batches:
            sq = batch.detach().to(torch.float64).square().sum()
            total = sq if total is None else total + sq
            count += batch.shape[0]
        if total is None or count == 0:
            raise ValueError("fit_scale needs at least one non-empty batch")
        value = math.sqrt(float(total) / count)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"scale must be finite and > 0, got {value} (all-zero or non-finite data?)")
        self.scale.fill_(value)
        return value

    def loss(self, x: Tensor, track_dead: bool = True, ranks: Ranks | None = None) -> SAELoss:
        """Training loss on unscaled vectors x (N, C): FaCT's mse sum_n ||x_n / s - x_hat_n||^2 / N
        (module doc) + aux_coef * aux-k loss.
        With `track_dead`, first updates `tokens_since_fired` with this batch. With several `ranks`,
        x is this rank's part of the batch and the sums run over every rank's part (module doc)."""
        ranks = ranks or Ranks()
        xs = x / self.scale
        pre = self.pre_activations(xs)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        # Dense codes and one matmul, as dictionary_learning: pre is (N, J) already, and a BLAS product
        # with its backward is ~4x faster on the CPU than embedding_bag's sparse sum (benchmarks/sae.py).
        x_hat = self.decoder(torch.zeros_like(pre).scatter(-1, indices, values))
        residual = xs - x_hat
        count = reduce_(torch.tensor(float(x.shape[0]), device=x.device), ranks)
        mse = reduce_sum(residual.square().sum(), ranks) / count.clamp_min(1.0)

        if track_dead:
            self._update_dead(indices, x.shape[0], ranks)
        dead = self.tokens_since_fired >= self.dead_after
        aux = self._aux_loss(pre, dead, residual.detach(), count, ranks)
        loss = mse + self.aux_coef * aux
        dead_fraction = dead.float().mean()
        return SAELoss(loss, mse.detach(), aux.detach(), dead_fraction)

    @torch.no_grad()
    def renormalise_decoder(self) -> None:
        """Rescale every atom (decoder column) to unit L2 norm; call after each optimiser step."""
        weight = self.decoder.weight
        weight.div_(weight.norm(dim=0, keepdim=True).clamp_min(_EPS))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of each atom's gradient its component along the atom. Call between backward and
        the optimiser step: with unit-norm atoms that component only changes the norm, which
        `renormalise_decoder` undoes anyway, and it would skew Adam's moment estimates."""
        weight, grad = self.decoder.weight, self.decoder.weight.grad
        if grad is None:
            return
        coef = (grad * weight).sum(dim=0, keepdim=True) / weight.square().sum(dim=0, keepdim=True).clamp_min(_EPS)
        grad.sub_(coef * weight)

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_dead(self, indices: Tensor, n_tokens: int, ranks: Ranks) -> None:
        # "Fired" = chosen by the top-k, whatever the value (FaCT, dictionary_learning). index_fill is
        # deterministic with repeated indices (every write is the same 1).
        fired = torch.zeros(self.n_concepts, dtype=torch.uint8, device=indices.device).index_fill_(0, indices.flatten(), 1)
        tokens = reduce_(torch.tensor(n_tokens, device=indices.device), ranks)
        self.tokens_since_fired.add_(tokens).masked_fill_(reduce_(fired, ranks, "max").bool(), 0)

    def _aux_loss(self, pre: Tensor, dead: Tensor, residual: Tensor, count: Tensor, ranks: Ranks) -> Tensor:
        """The min(aux_k, #dead) largest pre-activations among dead latents reconstruct the residual;
        0 while nothing is dead. Counting the dead costs one host sync per step (dictionary_learning's
        too), which saves the aux pass, a top-k over all J latents, whenever no latent is dead; the
        count is the same on every rank (the fired flags are reduced), so all take the same branch."""
        n_dead = int(dead.sum())
        if n_dead == 0 or self.aux_k == 0 or self.aux_coef == 0:
            return residual.new_zeros(())
        values, indices = pre.masked_fill(~dead, -math.inf).topk(min(self.aux_k, n_dead), dim=-1, sorted=False)
        recon = self.decoder(torch.zeros_like(pre).scatter(-1, indices, values))
        centred = residual - reduce_(residual.sum(dim=0, keepdim=True), ranks) / count
        return reduce_sum((residual - recon).square().sum(), ranks) / reduce_(centred.square().sum(), ranks).clamp_min(_EPS)
