"""SALF-CBM spatial concept similarity P[n, m, h, w] = cos(E_I(x_n^(h,w)), E_T(t_m)).

The circles store has the image side, the concepts store the text side; P is one matmul away,
so stages may materialise it (fp16) or call `similarity_batch` on the fly.
"""

import torch
import torch.nn.functional as F

__all__ = ["similarity_batch"]


def similarity_batch(circle_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosines (B, M, G, G) float32 of red-circle embeddings (B, G, G, D) and text embeddings (M, D).

    Both sides are re-normalised in fp32 (stores keep them in fp16, which is not exactly unit
    norm); the result is on circle_emb's device.
    """
    if circle_emb.ndim != 4:
        raise ValueError(f"circle_emb must have shape (B, G, G, D), got {tuple(circle_emb.shape)}")
    if text_emb.ndim != 2 or text_emb.shape[1] != circle_emb.shape[3]:
        raise ValueError(
            f"text_emb must have shape (M, {circle_emb.shape[3]}) to match circle_emb's D, "
            f"got {tuple(text_emb.shape)}"
        )
    image = F.normalize(circle_emb.float(), dim=-1)
    text = F.normalize(text_emb.to(circle_emb.device, torch.float32), dim=-1)
    batch, gh, gw, dim = image.shape
    # (B*G*G, D) @ (D, M): a single GEMM, then a cheap permute to the (B, M, G, G) layout of P.
    sims = image.reshape(-1, dim) @ text.T
    return sims.view(batch, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
