"""The open_clip folder format: a config (model_cfg + preprocess_cfg) beside the weights, and its preprocessing."""

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.kernels.preprocess import Preprocess
from lib.models.weights import portable_state_dict

CONFIG_NAME = "open_clip_config.json"  # open_clip's (and the HF hub's) config file name
WEIGHTS_NAME = "open_clip_pytorch_model.bin"


def preprocess_from_open_clip(cfg: dict[str, Any]) -> Preprocess:
    """Preprocess from an open_clip preprocess_cfg dict (square sizes; padding fill 0)."""
    size = cfg["size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"only square CLIP inputs are supported, got size {size!r}")
        size = size[0]
    if cfg.get("fill_color", 0) != 0:
        raise ValueError(f"only fill_color 0 is supported, got {cfg['fill_color']!r}")
    return Preprocess(
        size=int(size), mean=cfg["mean"], std=cfg["std"],
        interpolation=cfg.get("interpolation", "bicubic"), resize_mode=cfg.get("resize_mode", "shortest"),
    )


def save_clip_dir(
    folder: str | os.PathLike, model: nn.Module, model_cfg: dict[str, Any], preprocess: Preprocess, half: bool = False
) -> Path:
    """Write `model` as an open_clip local-dir folder that `load_clip(..., "local-dir:<folder>")` reads.

    model_cfg: the open_clip model config the model was built from (embed_dim, vision_cfg,
    text_cfg, ...). half=True stores floating tensors as fp16. Returns the folder.
    """
    if preprocess.resize_size is not None:
        raise ValueError(f"open_clip configs have no resize_size; got {preprocess.resize_size} (use resize_size=None)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pp = preprocess.to_dict()
    pp.pop("resize_size")
    (folder / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}, indent=2))
    torch.save(portable_state_dict(model, half), folder / WEIGHTS_NAME)
    return folder
