"""Reading the concepts store (written by the concepts stage): names, types, prompts, text embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib.core.errors import UserError
from lib.core.schema import TEXT_EMB
from lib.core.stores import open_store

__all__ = ["Concepts", "read_concepts"]


@dataclass(frozen=True)
class Concepts:
    """The kept concepts, in the order of P's concept axis."""

    names: tuple[str, ...]
    types: tuple[str | None, ...]
    prompts: tuple[str, ...]
    text_emb: torch.Tensor  # (M, D) float32, L2-normalised
    attrs: Mapping[str, Any]  # provenance, including the CLIP that embedded them


def read_concepts(path: str | Path) -> Concepts:
    """Read a concepts store written by :func:`run_concepts` (refuses an incomplete one)."""
    group = open_store(path)
    attrs = dict(group.attrs)
    listed = attrs.get("concepts") or []
    text_emb = torch.from_numpy(group[TEXT_EMB][:]).to(torch.float32)
    if len(listed) != text_emb.shape[0]:
        raise UserError(
            f"{path}: attribute 'concepts' lists {len(listed)} concepts for {text_emb.shape[0]} text embeddings; "
            "rerun the concepts stage"
        )
    return Concepts(
        tuple(c["name"] for c in listed), tuple(c["type"] for c in listed), tuple(c["prompt"] for c in listed),
        text_emb, attrs,
    )
