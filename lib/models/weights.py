"""Model weights as users name them: a named tag, a local file, "<tag>@<file>", or none (random init).

Shared by the backbone and CLIP loaders: parsing the `weights` value, loading state files without
unpickling code, provenance ids, guarded downloads, and the errors a user can fix.
"""

import difflib
import hashlib
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from lib.kernels.preprocess import Preprocess

CHECKPOINT_FORMAT = "conceptrace-backbone/1"
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class WeightsUnavailableError(RuntimeError):
    """Named weights could not be downloaded (typically: no network access)."""


class UnknownNameError(ValueError):
    """A model name its library does not know."""


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed `weights` argument: a tag, a local file, both (tag@file) or neither (random)."""

    tag: str | None
    path: Path | None


def parse_weights(weights: str | os.PathLike | None) -> WeightsSpec:
    """Classify `weights` (see module doc); a path-like value that does not exist raises ValueError."""
    if weights is None or str(weights).strip().lower() in ("", "none"):
        return WeightsSpec(None, None)
    text = str(weights)
    if Path(text).is_file():
        return WeightsSpec(None, Path(text))
    tag, at, rest = text.partition("@")
    if at:
        if not tag or not Path(rest).is_file():
            raise ValueError(f"weights {text!r}: expected '<tag>@<existing file>', file {rest!r} not found")
        return WeightsSpec(tag, Path(rest))
    if os.sep in text or "/" in text or text.endswith(_FILE_SUFFIXES):
        raise ValueError(f"weights file {text!r} not found (weights may be None, a tag, a file, or '<tag>@<file>')")
    return WeightsSpec(text, None)


def file_id(path: Path) -> str:
    """Provenance of a weights file: its name and a short content hash."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"file={path.name} sha256={digest}"


def load_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict, conceptrace metadata or None) from a checkpoint, never unpickling code.

    Accepts safetensors, plain state dicts, {"state_dict": ...} / {"model": ...} training
    checkpoints and `save_backbone` files; a DataParallel "module." prefix is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds pickled objects besides tensors and is not loaded (weights_only=True); "
            f"re-save it as torch.save(model.state_dict(), path)"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, expected a state dict")
    meta = checkpoint.get("meta") if checkpoint.get("format") == CHECKPOINT_FORMAT else None
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint, meta


@contextmanager
def fetching(what: str, offline_hint: str) -> Iterator[None]:
    """Guard a library download: force weights_only loading, turn network errors into a clear error.

    torch.hub and libraries built on it call torch.load(weights_only=False); the environment
    switch makes torch refuse pickled code there too.
    """
    with mock.patch.dict(os.environ, {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}):
        try:
            yield
        except OSError as error:  # URLError, socket errors and huggingface_hub's offline errors
            raise WeightsUnavailableError(
                f"could not download {what} ({type(error).__name__}: {error}). Named weights need network "
                f"access; offline, fetch the file elsewhere and pass its local path instead, e.g. {offline_hint}"
            ) from error


def unknown_name_error(kind: str, value: str, valid: list[str]) -> UnknownNameError:
    """UnknownNameError for an unknown model name, listing the closest valid ones."""
    close = difflib.get_close_matches(value, valid, n=8, cutoff=0.4)
    return UnknownNameError(f"unknown {kind} {value!r}; close matches: {', '.join(close) or 'none'} ({len(valid)} available)")


def portable_state_dict(model: nn.Module, half: bool) -> dict[str, torch.Tensor]:
    """`model`'s state dict on the CPU; half=True stores floating tensors as fp16 (they load into fp32)."""
    return {k: v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()
            for k, v in model.state_dict().items()}


def save_backbone(
    path: str | os.PathLike, model: nn.Module, arch: str, num_classes: int, preprocess: Preprocess, half: bool = True
) -> Path:
    """Write `model` so that `load_backbone(arch, path)` rebuilds it with `preprocess`.

    half=True stores floating tensors as fp16 (they load back into fp32 models), halving the
    size of shipped toy weights. Returns the path.
    """
    source, colon, name = arch.partition(":")
    if not (source and colon and name):
        raise ValueError(f"arch {arch!r} must look like '<source>:<name>', e.g. 'toy:cnn'")
    state = portable_state_dict(model, half)
    meta = {"arch": arch, "num_classes": num_classes, "preprocess": preprocess.to_dict()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "meta": meta, "state_dict": state}, path)
    return path
