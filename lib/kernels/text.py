"""CLIP text encoding of prompts, batched on the model's device."""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.inference_mode()
def encode_texts(
    clip_model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    prompts: Sequence[str],
    batch_size: int = 1024,
) -> torch.Tensor:
    """L2-normalised float32 CLIP text embeddings (len(prompts), D), on the model's device.

    The tokenizer maps prompts to token ids (open_clip.get_tokenizer(...) fits).
    """
    if not prompts:
        raise ValueError("prompts is empty: nothing to encode")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(clip_model.parameters()).device
    chunks = [
        clip_model.encode_text(tokenizer(list(prompts[i : i + batch_size])).to(device)).float()
        for i in range(0, len(prompts), batch_size)
    ]
    return F.normalize(torch.cat(chunks), dim=-1)
