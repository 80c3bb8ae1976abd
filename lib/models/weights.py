"""Model weights as users name them: a named tag, a local file, "<tag>@<file>", or none (random init).

Shared by the backbone and CLIP loaders: parsing the `weights` value, loading state files without
unpickling code, provenance ids, guarded downloads, and the errors a user can fix.
"""

import difflib
import hashlib
import os
import pickle
import socket
import urllib.parse
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cache
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


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive (torch.jit.save; OpenAI's CLIP releases, e.g. ViT-B-16.pt):
    a zip whose root folder holds constants.pkl, the test torch.load itself applies before handing
    such a file to torch.jit.load."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.partition("/")[2] == "constants.pkl" for name in archive.namelist())


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


_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@cache
def hub_unreachable() -> str | None:
    """The Hugging Face Hub's host when it does not accept a connection within 3 s, else None.

    None behind a proxy (it may reach the Hub when we cannot) and in huggingface_hub's own
    offline mode. Asked once per process.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return url.hostname
    return None


def _from_hub(error: BaseException | None) -> bool:
    """Whether huggingface_hub raised `error` or one of the errors it chains."""
    while error is not None:
        if type(error).__module__.startswith("huggingface_hub"):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def fetching(what: str, offline_hint: str) -> Iterator[None]:
    """Guard a library download: force weights_only loading, turn network errors into a clear error.

    torch.hub and libraries built on it call torch.load(weights_only=False); the environment
    switch makes torch refuse pickled code there too. When the Hugging Face Hub cannot be reached,
    its offline mode is switched on: the file comes from its cache or the error comes at once,
    instead of after huggingface_hub's retries (about a minute per file).
    """
    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}))
        host = hub_unreachable()
        if host is not None:
            from huggingface_hub import constants

            stack.enter_context(mock.patch.object(constants, "HF_HUB_OFFLINE", True))
        try:
            yield
        except OSError as error:  # URLError, socket errors and huggingface_hub's offline errors
            if host is not None and _from_hub(error):
                cause = f"{host} cannot be reached and the file is not in the local cache"
            else:
                cause = f"{type(error).__name__}: {error}"
            raise WeightsUnavailableError(
                f"could not download {what} ({cause}). Named weights need network access; offline, "
                f"fetch the file elsewhere and pass its local path instead, e.g. {offline_hint}"
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
