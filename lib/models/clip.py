"""open_clip loading with the preprocessing that belongs to the checkpoint.

`pretrained` is one of:
  None / "none"          random initialisation (preprocessing from the model config);
  "<tag>"                open_clip's named weights (e.g. "openai", "laion2b_s34b_b79k"): needs network;
  "<tag>@<path>"         a local copy of a tag's weights, with that tag's preprocessing (offline);
  "<path>"               a local file with an `open_clip_config.json` beside it (its "preprocess_cfg");
  "local-dir:<folder>"   a folder with open_clip_config.json (model_cfg + preprocess_cfg) and weights,
                         as written by `save_clip_dir`; it defines the architecture itself.
A bare file without a config is refused rather than silently given OpenAI's mean/std.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from open_clip.factory import _find_checkpoint_in_dir  # the file open_clip itself will pick
from torch import nn

from lib.core.errors import user_error_for
from lib.kernels.preprocess import Preprocess
from lib.models.clip_format import CONFIG_NAME, preprocess_from_open_clip
from lib.models.weights import UnknownNameError, WeightsUnavailableError, fetching, file_id, parse_weights, unknown_name_error

if TYPE_CHECKING:
    from lib.core.params import ClipParams

LOCAL_DIR = "local-dir:"


@dataclass
class LoadedClip:
    """An open_clip model ready for inference: eval mode, parameters frozen, on the CPU."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]  # list[str] -> token ids (T, context_length)
    preprocess: Preprocess
    model_id: str  # provenance: "open_clip:<model>|<weights>"
    embed_dim: int


def _read_config(path: Path) -> dict[str, Any]:
    config = json.loads(path.read_text())
    if "preprocess_cfg" not in config:
        raise ValueError(f"{path} has no 'preprocess_cfg'; add the checkpoint's size/mean/std/interpolation/resize_mode")
    return config


def _load_local_dir(folder: Path) -> LoadedClip:
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"pretrained 'local-dir:{folder}' needs {folder / CONFIG_NAME} (model_cfg + preprocess_cfg)")
    config = _read_config(folder / CONFIG_NAME)
    weights = _find_checkpoint_in_dir(folder)
    if weights is None:  # open_clip would only warn and return a random model
        raise ValueError(f"no weights (*.safetensors, *.bin, *.pth) found in {folder}")
    model = open_clip.create_model(f"{LOCAL_DIR}{folder}", weights_only=True)
    tokenizer = open_clip.get_tokenizer(f"{LOCAL_DIR}{folder}")
    return _finish(model, tokenizer, f"open_clip:{LOCAL_DIR}{folder}|{file_id(Path(weights))}", config["model_cfg"]["embed_dim"])


def _finish(model: nn.Module, tokenizer: Callable, model_id: str, embed_dim: int) -> LoadedClip:
    model.eval().requires_grad_(False)
    preprocess = preprocess_from_open_clip(model.visual.preprocess_cfg)
    return LoadedClip(model, tokenizer, preprocess, model_id, embed_dim)


def load_clip(model_name: str, pretrained: str | os.PathLike | None) -> LoadedClip:
    """Build open_clip `model_name` (e.g. "ViT-B-16") and load `pretrained` (see module doc).

    With "local-dir:<folder>" (in either argument) the folder's config defines the model and
    `model_name` is only a label. Raises WeightsUnavailableError when a tag cannot be
    downloaded and ValueError on bad arguments.
    """
    for value in (pretrained, model_name):
        if value is not None and str(value).startswith(LOCAL_DIR):
            return _load_local_dir(Path(str(value).removeprefix(LOCAL_DIR)))
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise unknown_name_error("open_clip model", model_name, open_clip.list_models())
    spec = parse_weights(pretrained)
    weights_cfg: dict[str, Any] = {}  # the tag's or the sibling config's preprocessing (+ quick_gelu)
    if spec.tag is not None:
        weights_cfg = open_clip.get_pretrained_cfg(model_name, spec.tag)
        if not weights_cfg:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise ValueError(f"unknown pretrained tag {spec.tag!r} for {model_name}; valid: {', '.join(tags) or 'none'}")
    checkpoint = spec.path
    if spec.path is None and spec.tag is not None:
        with fetching(f"open_clip weights {model_name}/{spec.tag}", f"pretrained='{spec.tag}@/path/to/open_clip_model.safetensors'"):
            checkpoint = Path(open_clip.download_pretrained(weights_cfg))
    if spec.path is not None and spec.tag is None:
        sibling = spec.path.parent / CONFIG_NAME
        if not sibling.is_file():
            raise ValueError(
                f"cannot tell the preprocessing of {spec.path}: put its {CONFIG_NAME} (with 'preprocess_cfg') beside it, "
                f"or name the tag it came from as pretrained='<tag>@{spec.path}' "
                f"(tags for {model_name}: {', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'})"
            )
        config = _read_config(sibling)
        weights_cfg = {**config["preprocess_cfg"], "quick_gelu": config.get("model_cfg", {}).get("quick_gelu", False)}
    model = open_clip.create_model(
        model_name,
        pretrained=str(checkpoint) if checkpoint else None,
        force_quick_gelu=bool(weights_cfg.get("quick_gelu", False)),  # e.g. OpenAI weights were trained with QuickGELU
        force_preprocess_cfg=weights_cfg,  # open_clip keeps only the preprocessing keys
        weights_only=True,
    )
    weights_id = file_id(checkpoint) if spec.path else (f"tag={spec.tag}" if spec.tag else "random")
    return _finish(model, open_clip.get_tokenizer(model_name), f"open_clip:{model_name}|{weights_id}", model_cfg["embed_dim"])


def load_clip_checked(settings: ClipParams) -> LoadedClip:
    """`load_clip` for the `clip` params section: what the user can fix is a UserError naming the key."""
    with user_error_for("clip.model", settings.model, catch=(UnknownNameError,)):
        with user_error_for("clip.pretrained", settings.pretrained, catch=(ValueError, FileNotFoundError, WeightsUnavailableError)):
            return load_clip(settings.model, settings.pretrained)
