"""Sentence-encoder text embeddings for LF-CBM's concept similarity (concepts.sentence_model).

LF-CBM filters its concept lists with (all-mpnet-base-v2 cosine + 3 CLIP cosine) / 4
(conceptset_utils.py). The encoder is read from a local sentence-transformers folder (nothing is
downloaded); the package is an optional dependency (`pip install conceptrace[sentence]`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lib.core.errors import UserError

__all__ = ["KEY", "check_sentence_model", "load_sentence_encoder"]

KEY = "concepts.sentence_model"
FIX = "set it to a local sentence-transformers model folder (e.g. a saved all-mpnet-base-v2), or null for CLIP's similarity alone"


def check_sentence_model(path: str | None) -> None:
    """The folder `concepts.sentence_model` names exists (None: no sentence encoder; nothing to check)."""
    if path is not None and not Path(path).is_dir():
        raise UserError("not a directory", key=KEY, value=path, fix=FIX)


def load_sentence_encoder(path: str, device: torch.device) -> Callable[[Sequence[str]], torch.Tensor]:
    """texts -> unit-norm float32 embeddings (n, D') on `device`, from the sentence-transformers model at `path`."""
    check_sentence_model(path)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError(
            "needs the optional package sentence-transformers", key=KEY, value=path,
            fix="pip install 'sentence-transformers>=3' (or conceptrace[sentence]), or set it to null",
        ) from None
    model = SentenceTransformer(path, device=str(device), local_files_only=True)

    def encode(texts: Sequence[str]) -> torch.Tensor:
        embeddings = model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)
        return embeddings.to(device, torch.float32)

    return encode
