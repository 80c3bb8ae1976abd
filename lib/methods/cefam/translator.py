"""CE-FAM's translator h: pooled multi-layer backbone features -> the VLM's image-embedding space.

z^l = global average pool of layer l's activation maps, z_cat = concat over layers (paper eq. 4-5),
h(z_cat) an MLP with tanh activations (App. A.2: 3840 -> 2048 -> 1024 -> 512 for ResNet-50 and
CLIP). A concept's score is the scaled cosine of h(z_cat) with its text embedding (eq. 6 writes a
dot product; the authors' `converter.py` (MapConverter.forward) L2-normalises h(z_cat), takes the
dot product with L2-normalised text embeddings, multiplies by the VLM's logit scale
(exp(logit_scale) = 100 for CLIP) and adds its logit bias (0 for CLIP; SigLIP has one)).

Training loss (eq. 8-10, and the authors' `train.py`): MSE(h(z_cat), E_image(x)) +
lam * MSE(S_pred, S_vlm) with both score matrices in the scaled-cosine form above and lam = 0.001.
The authors regress the *raw* (unnormalised) CLIP image features; if the targets are
L2-normalised instead, the embedding term shrinks by about |E_image|^2, so the same lam weighs the
similarity term correspondingly more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLIP_LOGIT_SCALE",
    "SIM_LOSS_WEIGHT",
    "Translator",
    "concept_scores",
    "default_hidden",
    "embedding_loss",
    "similarity_loss",
    "translator_loss",
]

CLIP_LOGIT_SCALE = 100.0  # exp(logit_scale) of the released CLIP models: the authors' `scale`
SIM_LOSS_WEIGHT = 1e-3  # lambda of eq. 8 (paper §4.1 and train.py)


def default_hidden(in_dim: int, out_dim: int, n_hidden: int = 2) -> tuple[int, ...]:
    """Hidden widths of the translator: geometric steps from `in_dim` to `out_dim`, each rounded
    to the nearest power of two (on a log scale).

    With two hidden layers the k-th width is in_dim * (out_dim / in_dim) ** (k / 3); for ResNet-50
    into CLIP (3840 -> 512) that is 1962 and 1002, i.e. the paper's 2048 and 1024, and the rule
    scales the same shape to any input (ResNet-18's 960 -> 512 gives 1024, 512; the authors' code
    uses 1024, 1024 there). Powers of two keep the layers GPU-friendly.
    """
    if in_dim < 1 or out_dim < 1 or n_hidden < 0:
        raise ValueError(f"in_dim and out_dim must be >= 1 and n_hidden >= 0; got {in_dim}, {out_dim}, {n_hidden}")
    ratio = out_dim / in_dim
    widths = (in_dim * ratio ** (k / (n_hidden + 1)) for k in range(1, n_hidden + 1))
    return tuple(2 ** round(math.log2(w)) for w in widths)


def concept_scores(emb: Tensor, text_emb: Tensor, scale: float | Tensor = CLIP_LOGIT_SCALE, bias: float | Tensor = 0.0) -> Tensor:
    """Scaled cosine scale * cos(emb, text) + bias of embeddings (..., D) with text embeddings
    (M, D): (..., M). Both sides are L2-normalised here, so raw embeddings may be passed."""
    return F.normalize(emb, dim=-1) @ F.normalize(text_emb, dim=-1).T * scale + bias


class Translator(nn.Module):
    """MLP h: z_cat (B, in_dim) -> embeddings (B, out_dim), tanh after every hidden layer.

    hidden: widths of the hidden layers (default `default_hidden(in_dim, out_dim)`; () gives a
    single linear map). scale, bias: the VLM's logit scale and bias used by `scores`; they are
    buffers, so a saved state dict carries them.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] | None = None,
        scale: float = CLIP_LOGIT_SCALE,
        bias: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = default_hidden(in_dim, out_dim) if hidden is None else tuple(int(h) for h in hidden)
        if in_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"in_dim, out_dim and hidden widths must be >= 1; got {in_dim}, {out_dim}, {hidden}")
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        dims = (in_dim, *hidden, out_dim)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("bias", torch.tensor(float(bias)))

    def forward(self, z_cat: Tensor) -> Tensor:
        """Embeddings (..., out_dim) of pooled features (..., in_dim)."""
        x = z_cat
        for layer in self.layers[:-1]:
            # tanh, not ReLU: VLM embeddings have negative coordinates (App. A.2)
            x = torch.tanh(layer(x))
        return self.layers[-1](x)

    def scores(self, z_cat: Tensor, text_emb: Tensor) -> Tensor:
        """Concept scores S (..., M) of pooled features (..., in_dim) for text embeddings (M, D)."""
        return concept_scores(self(z_cat), text_emb, self.scale, self.bias)


def embedding_loss(pred: Tensor, target_emb: Tensor) -> Tensor:
    """L_emb = MSE(h(z_cat), E_image(x)) (eq. 9), mean over batch and dimensions."""
    return F.mse_loss(pred, target_emb)


def similarity_loss(
    pred: Tensor, target_emb: Tensor, text_emb: Tensor, scale: float | Tensor = CLIP_LOGIT_SCALE
) -> Tensor:
    """L_sim = MSE(S_pred, S_vlm) (eq. 10) over all (image, concept) pairs, scores as in
    `concept_scores` (the bias cancels in the difference, so it is not a parameter)."""
    text = F.normalize(text_emb, dim=-1)
    return F.mse_loss(concept_scores(pred, text, scale), concept_scores(target_emb, text, scale))


def translator_loss(
    pred: Tensor,
    target_emb: Tensor,
    text_emb: Tensor | None = None,
    lam: float = SIM_LOSS_WEIGHT,
    scale: float | Tensor = CLIP_LOGIT_SCALE,
) -> Tensor:
    """L_total = L_emb + lam * L_sim (eq. 8). pred, target_emb: (B, D); text_emb: (M, D).

    lam = 0 is the concept-free variant (no concept list at training time, paper §4.6): then
    text_emb may be None and the similarity term is not computed.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0; got {lam}")
    if pred.shape != target_emb.shape:
        raise ValueError(f"pred and target_emb must have the same shape; got {tuple(pred.shape)} and {tuple(target_emb.shape)}")
    loss = embedding_loss(pred, target_emb)
    if lam == 0:
        return loss
    if text_emb is None:
        raise ValueError("text_emb is required when lam > 0 (the similarity loss compares concept scores)")
    return loss + lam * similarity_loss(pred, target_emb, text_emb, scale)
