"""open_clip loading with the preprocessing that belongs to the checkpoint.

`pretrained` is one of:
  None / "none"          random initialisation (preprocessing from the model config);
  "<tag>"                open_clip's named weights (e.g. "openai", "laion2b_s34b_b79k"): needs network;
  "<tag>@<path>"         a local copy of a tag's weights, with that tag's preprocessing (offline); OpenAI's
                         TorchScript releases load as they are ("openai@/models/clip/ViT-B-16.pt");
  "<path>"               a local file with an `open_clip_config.json` beside it (its "preprocess_cfg");
  "local-dir:<folder>"   a folder with open_clip_config.json (model_cfg + preprocess_cfg) and weights,
                         as written by `save_clip_dir`; it defines the architecture itself.
A bare file without a config is refused rather than silently given OpenAI's mean/std.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from open_clip.factory import _find_checkpoint_in_dir  # the file open_clip itself will pick
from open_clip.model import CLIPVisionCfg
from torch import nn

from lib.core.errors import user_error_for
from lib.kernels.preprocess import Preprocess
from lib.models.clip_format import CONFIG_NAME, preprocess_from_open_clip
from lib.models.weights import (
    UnknownNameError,
    WeightsUnavailableError,
    fetching,
    file_id,
    is_torchscript_archive,
    parse_weights,
    unknown_name_error,
)

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


@dataclass(frozen=True)
class ClipSource:
    """What `model_name` and `pretrained` name, resolved without reading or downloading weights."""

    model_name: str  # open_clip's name of the model, or "local-dir:<folder>"
    model_cfg: dict[str, Any]
    tag: str | None  # named weights to download (None: a local file or random init)
    checkpoint: Path | None  # the local weights file
    weights_cfg: dict[str, Any]  # the tag's or the sibling config's preprocessing (+ quick_gelu); {} for local-dir

    @property
    def input_size(self) -> int:
        """The side of the square CLIP input in pixels, as open_clip.create_model will set it: the
        vision tower's image_size, unless the weights' preprocessing names a size."""
        size = self.weights_cfg.get("size") or self.model_cfg.get("vision_cfg", {}).get("image_size", CLIPVisionCfg.image_size)
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"only square CLIP inputs are supported, got size {size!r}")
            size = size[0]
        return int(size)


def _local_dir(folder: Path) -> ClipSource:
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"pretrained 'local-dir:{folder}' needs {folder / CONFIG_NAME} (model_cfg + preprocess_cfg)")
    config = _read_config(folder / CONFIG_NAME)
    weights = _find_checkpoint_in_dir(folder)
    if weights is None:  # open_clip would only warn and return a random model
        raise ValueError(f"no weights (*.safetensors, *.bin, *.pth) found in {folder}")
    return ClipSource(f"{LOCAL_DIR}{folder}", config["model_cfg"], None, Path(weights), {})


def resolve_clip(model_name: str, pretrained: str | os.PathLike | None) -> ClipSource:
    """Check `model_name` and `pretrained` (see module doc) as far as that needs no weights: the model
    exists, the tag is one of its tags, the files and configs named exist. Raises what `load_clip` raises."""
    for value in (pretrained, model_name):
        if value is not None and str(value).startswith(LOCAL_DIR):
            return _local_dir(Path(str(value).removeprefix(LOCAL_DIR)))
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise unknown_name_error("open_clip model", model_name, open_clip.list_models())
    spec = parse_weights(pretrained)
    weights_cfg: dict[str, Any] = {}
    if spec.tag is not None:
        weights_cfg = open_clip.get_pretrained_cfg(model_name, spec.tag)
        if not weights_cfg:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise ValueError(f"unknown pretrained tag {spec.tag!r} for {model_name}; valid: {', '.join(tags) or 'none'}")
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
    return ClipSource(model_name, model_cfg, spec.tag, spec.path, weights_cfg)


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
    source = resolve_clip(model_name, pretrained)
    embed_dim = source.model_cfg["embed_dim"]
    if source.model_name.startswith(LOCAL_DIR):
        model = open_clip.create_model(source.model_name, weights_only=True)
        tokenizer = open_clip.get_tokenizer(source.model_name)
        return _finish(model, tokenizer, f"open_clip:{source.model_name}|{file_id(source.checkpoint)}", embed_dim)
    checkpoint = source.checkpoint
    if checkpoint is None and source.tag is not None:
        with fetching(f"open_clip weights {model_name}/{source.tag}", f"pretrained='{source.tag}@/path/to/open_clip_model.safetensors'"):
            checkpoint = Path(open_clip.download_pretrained(source.weights_cfg))
    with warnings.catch_warnings():  # torch.load's note on TorchScript archives: they are expected here
        warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
        model = _create(model_name, checkpoint, source)
    weights_id = file_id(checkpoint) if source.checkpoint else (f"tag={source.tag}" if source.tag else "random")
    return _finish(model, open_clip.get_tokenizer(model_name), f"open_clip:{model_name}|{weights_id}", embed_dim)


def _create(model_name: str, checkpoint: Path | None, source: ClipSource) -> nn.Module:
    """open_clip's model `model_name` with the weights of `checkpoint` (None: random) and `source`'s preprocessing."""
    return open_clip.create_model(
        model_name,
        pretrained=str(checkpoint) if checkpoint else None,
        force_quick_gelu=bool(source.weights_cfg.get("quick_gelu", False)),  # e.g. OpenAI weights were trained with QuickGELU
        force_preprocess_cfg=source.weights_cfg,  # open_clip keeps only the preprocessing keys
        # torch.load refuses a TorchScript archive under weights_only=True; without it, torch.load hands
        # the archive to torch.jit.load (TorchScript's own restricted unpickler, no Python pickle) and
        # open_clip takes the state dict of the ScriptModule. Any other file stays weights_only.
        weights_only=not (checkpoint and is_torchscript_archive(checkpoint)),
    )


@contextmanager
def _clip_keys(settings: ClipParams) -> Iterator[None]:
    """Errors the `clip` section causes as UserErrors naming its keys (an unknown model: clip.model)."""
    with user_error_for("clip.pretrained", settings.pretrained, catch=(ValueError, FileNotFoundError, WeightsUnavailableError)):
        with user_error_for("clip.model", settings.model, catch=(UnknownNameError,), fix="set it to a model of open_clip.list_models()"):
            yield


def check_clip(settings: ClipParams) -> int:
    """Check the `clip` section before any work (no weights read); return the CLIP's input size in pixels."""
    with _clip_keys(settings):
        return resolve_clip(settings.model, settings.pretrained).input_size


def dense_layer(model: nn.Module) -> str:
    """The name, in `model.visual`, of an open_clip CLIP's last spatial feature map: a ModifiedResNet's
    `layer4` (the attention pool's input) or a VisionTransformer's `transformer` (its patch tokens,
    before the final norm and pooling). lib.models.layers.extract_layers turns either into (B, D', h, w)."""
    kind = type(model.visual).__name__
    names = {"ModifiedResNet": "layer4", "VisionTransformer": "transformer"}
    if kind not in names:
        raise ValueError(f"no dense feature map known for an open_clip visual tower of type {kind}; known: {', '.join(names)}")
    return names[kind]


def load_clip_checked(settings: ClipParams) -> LoadedClip:
    """`load_clip` for the `clip` params section: what the user can fix is a UserError naming the key."""
    with _clip_keys(settings):
        return load_clip(settings.model, settings.pretrained)
