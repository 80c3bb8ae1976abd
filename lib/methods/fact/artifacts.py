"""The published SAE (data/<name>/fact/sae.pt): what the sae stage writes and every later stage loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lib.core.outputs import write_atomic
from lib.methods.fact.sae import BiasFreeTopKSAE

__all__ = ["load_sae", "save_sae"]


def save_sae(path: Path, model: BiasFreeTopKSAE, record: dict[str, Any]) -> None:
    """Write the model's config and weights with `record` (layer, model_id, ...: plain values) atomically."""
    write_atomic(path, lambda tmp: torch.save({**record, "sae_config": model.config(), "state_dict": model.state_dict()}, tmp))


def load_sae(path: Path, device: torch.device | str = "cpu") -> tuple[BiasFreeTopKSAE, dict[str, Any]]:
    """The published SAE (eval mode, frozen, on `device`) and its record (layer, model_id, fve_val, ...)."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    model = BiasFreeTopKSAE(**record.pop("sae_config"))
    model.load_state_dict(record.pop("state_dict"))
    return model.to(device).eval().requires_grad_(False), record
