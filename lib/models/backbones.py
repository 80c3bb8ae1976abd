"""One entry point that loads a vision backbone (torchvision, timm, B-cos, toy) with its preprocessing.

`weights` is one of:
  None / "none"      random initialisation;
  "<tag>"            the library's named weights (e.g. "IMAGENET1K_V2", "DEFAULT"): needs network;
  "<path>"           a local checkpoint, loaded with torch.load(weights_only=True) (or safetensors);
  "<tag>@<path>"     a local copy of a tag's weights: the file's tensors, the tag's preprocessing.
A checkpoint written by `save_backbone` carries its arch, class count and preprocessing; a plain
state dict (e.g. a library's release file) gets the tag's or else the arch's default preprocessing.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from bcos.data.transforms import AddInverse
from torch import nn

from lib.core.errors import UserError, user_error_for
from lib.kernels.preprocess import Preprocess
from lib.models.classes import OutputNames, imagenet_classes
from lib.models.weights import (
    UnknownNameError,
    WeightsSpec,
    WeightsUnavailableError,
    fetching,
    file_id,
    load_state_file,
    parse_weights,
    unknown_name_error,
)

if TYPE_CHECKING:
    from lib.core.params import BackboneParams

log = logging.getLogger(__name__)

SOURCES = ("torchvision", "timm", "bcos", "toy")


@dataclass
class LoadedBackbone:
    """A backbone ready for inference: eval mode, parameters frozen, on the CPU."""

    model: nn.Module
    preprocess: Preprocess
    model_id: str  # provenance: "<source>:<name>|<weights>", e.g. "toy:cnn|file=cnn.pt sha256=1a2b..."
    num_classes: int
    output_names: OutputNames | None = None  # what each output means, when known (lib/models/classes.py)


class BcosWithInverse(nn.Module):
    """A `bcos` package network fed [x, 1 - x]: takes 3-channel [0, 1] RGB like every other backbone."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.add_inverse = AddInverse()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.add_inverse(x))

    def explanation_mode(self):
        """The wrapped network's explanation-mode context (detached dynamic weights)."""
        return self.net.explanation_mode()


# Builders: (name, tag, num_classes, fetch) -> (model, preprocess, num_classes); `fetch` False means
# a local file follows, so a tag only selects preprocessing. Each imports its library lazily.
def _torchvision(name: str, tag: str | None, num_classes: int | None, fetch: bool) -> tuple[nn.Module, Preprocess, int]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise unknown_name_error("torchvision classification model", name, torchvision.models.list_models(module=torchvision.models))
    weights_enum = torchvision.models.get_model_weights(name)
    if tag is not None and tag not in weights_enum.__members__:
        raise ValueError(f"unknown weights tag {tag!r} for torchvision:{name}; valid: {', '.join(weights_enum.__members__)}")
    weights = weights_enum[tag or "DEFAULT"]  # without a tag: only its preprocessing and class count
    classes = len(weights.meta["categories"])
    if tag is not None and num_classes not in (None, classes):
        raise ValueError(f"num_classes={num_classes} but torchvision:{name} weights {tag} have {classes} classes")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes or classes)
    if tag is not None and fetch:
        with fetching(f"torchvision weights {name}.{tag}", f"weights='{tag}@/path/to/{Path(weights.url).name}'"):
            model.load_state_dict(weights.get_state_dict(progress=False, check_hash=True, weights_only=True))
    t = weights.transforms()
    resize = t.resize_size[0]
    preprocess = Preprocess(
        size=t.crop_size[0],
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
        resize_size=resize if resize != t.crop_size[0] else None,
    )
    return model, preprocess, num_classes or classes


def _timm(name: str, tag: str | None, num_classes: int | None, fetch: bool) -> tuple[nn.Module, Preprocess, int]:
    import timm

    if not timm.is_model(name):
        raise unknown_name_error("timm model", name, timm.list_models())
    full = name if tag in (None, "DEFAULT") else f"{name}.{tag}"
    if full != name and full not in timm.list_pretrained(f"{name}.*"):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{name}.*")]
        raise ValueError(f"unknown weights tag {tag!r} for timm:{name}; valid: DEFAULT, {', '.join(tags)}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if tag is not None and fetch:
        with fetching(f"timm weights {full}", f"weights='{tag}@/path/to/model.safetensors'"):
            model = timm.create_model(full, pretrained=True, **kwargs)
    else:
        model = timm.create_model(full, pretrained=False, **kwargs)  # `full` still selects the tag's data config
    cfg = timm.data.resolve_model_data_config(model)
    if cfg["crop_mode"] != "center" or cfg["input_size"][1] != cfg["input_size"][2]:
        raise ValueError(
            f"timm:{full} needs crop_mode {cfg['crop_mode']!r} / input {cfg['input_size']}; only square centre crops are supported"
        )
    size = cfg["input_size"][-1]
    resize = math.floor(size / cfg["crop_pct"])  # timm's eval transform: resize to size / crop_pct, crop
    preprocess = Preprocess(
        size=size,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        resize_size=resize if resize != size else None,
    )
    return model, preprocess, model.num_classes


def _bcos(name: str, tag: str | None, num_classes: int | None, fetch: bool) -> tuple[nn.Module, Preprocess, int]:
    import bcos.models.pretrained as bcos_pretrained

    if name not in bcos_pretrained.list_available():
        raise unknown_name_error("B-cos model", name, bcos_pretrained.list_available())
    if tag not in (None, "DEFAULT"):
        raise ValueError(f"B-cos models have one released weight set; weights tag must be 'DEFAULT', got {tag!r}")
    entrypoint = getattr(bcos_pretrained, name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if tag is not None and fetch:
        with fetching(f"B-cos weights for {name}", "weights='DEFAULT@/path/to/<file>.pth' (bcos.models.pretrained.URLS lists the files)"):
            net = entrypoint(pretrained=True, progress=False, **kwargs)
    else:
        net = entrypoint(pretrained=False, progress=False, **kwargs)
    args = net.transform.args  # the package's eval preset: resize, crop, [0, 1], AddInverse (done by the wrapper)
    preprocess = Preprocess(
        size=args["crop_size"],
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation=args["interpolation"].value,
        resize_size=args["resize_size"],
    )
    return BcosWithInverse(net), preprocess, net.num_classes


def _toy(name: str, tag: str | None, num_classes: int | None, fetch: bool) -> tuple[nn.Module, Preprocess, int]:
    # The toy world's models register here and nowhere else: only this family reaches lib.toy.
    from lib.toy.models.cnn import TOY_ARCHS, build_toy, toy_preprocess
    from lib.toy.world import CLASSES

    if name not in TOY_ARCHS:
        raise unknown_name_error("toy model", name, list(TOY_ARCHS))
    if tag is not None:
        raise ValueError(f"toy models have no named weights ({tag!r}); pass the checkpoint written by the toy_backbone stage")
    num_classes = num_classes or len(CLASSES)
    return build_toy(name, num_classes), toy_preprocess(name), num_classes


_BUILDERS = {"torchvision": _torchvision, "timm": _timm, "bcos": _bcos, "toy": _toy}


def _output_names(source: str, num_classes: int) -> OutputNames | None:
    """The toy classes for a toy model with their count; ImageNet-1k for any other 1000-output model
    (torchvision, timm and B-cos all use its standard order); otherwise unknown (backbone.class_map)."""
    if source == "toy":
        from lib.toy.world import CLASSES

        return OutputNames("toy world", tuple(c.name for c in CLASSES)) if num_classes == len(CLASSES) else None
    return imagenet_classes() if num_classes == 1000 else None


def _parse_arch(arch: str, source: str) -> tuple[str, str]:
    if source not in ("auto", *SOURCES):
        raise ValueError(f"source must be 'auto' or one of {SOURCES}, got {source!r}")
    prefix, colon, name = arch.partition(":")
    if not colon:
        if source == "auto":
            raise UnknownNameError(f"arch {arch!r} needs a source prefix, e.g. 'torchvision:resnet50' (sources: {SOURCES})")
        return source, arch
    if prefix not in SOURCES or not name:
        raise UnknownNameError(f"arch {arch!r} must look like '<source>:<name>' with source in {SOURCES}")
    if source not in ("auto", prefix):
        raise ValueError(f"arch {arch!r} conflicts with source={source!r}")
    return prefix, name


def load_backbone(arch: str, weights: str | os.PathLike | None, num_classes: int | None = None, source: str = "auto") -> LoadedBackbone:
    """Build `arch` ("<source>:<name>", e.g. "torchvision:resnet50", "timm:vit_small_patch16_224",
    "bcos:resnet50", "toy:cnn", "toy:bcos"; or a bare name with `source`) and load `weights`.

    num_classes: None keeps the weights' (or the library's default) class count. B-cos models
    take 3-channel [0, 1] RGB (they are wrapped in BcosWithInverse, layer names "net.<...>").
    Raises WeightsUnavailableError when a tag cannot be downloaded, ValueError on bad arguments
    or a checkpoint that does not fit the architecture.
    """
    source, name = _parse_arch(arch, source)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
    spec = parse_weights(weights)
    state, meta = load_state_file(spec.path) if spec.path else (None, None)
    if meta is not None:
        if meta["arch"] != f"{source}:{name}":
            backbone_skeleton(f"{source}:{name}")  # an arch that does not exist is the error to report, not the file
            raise ValueError(
                f"{spec.path} holds a {meta['arch']} checkpoint, not {source}:{name}; pass a checkpoint of {source}:{name}, a tag or None"
            )
        if num_classes not in (None, meta["num_classes"]):
            raise ValueError(f"num_classes={num_classes} but {spec.path} has {meta['num_classes']} classes")
        num_classes = meta["num_classes"]
    model, preprocess, num_classes = _BUILDERS[source](name, spec.tag, num_classes, spec.path is None)
    if state is not None:
        # Plain state dicts are in the library's own layout, i.e. without our B-cos input wrapper.
        target = model.net if isinstance(model, BcosWithInverse) and meta is None else model
        try:
            target.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{spec.path} does not fit {source}:{name} (num_classes={num_classes}): {error}") from error
    if meta is not None:
        preprocess = Preprocess.from_dict(meta["preprocess"])
    elif spec.path is not None and spec.tag is None:
        log.warning(
            "%s has no preprocessing record; using %s:%s's default %s (pass '<tag>@<file>' to pick a tag's)",
            spec.path,
            source,
            name,
            preprocess,
        )
    weights_id = file_id(spec.path) if spec.path else (f"tag={spec.tag}" if spec.tag else "random")
    model.eval().requires_grad_(False)
    return LoadedBackbone(model, preprocess, f"{source}:{name}|{weights_id}", num_classes, _output_names(source, num_classes))


def backbone_skeleton(arch: str, tag: str | None = None) -> nn.Module:
    """`arch` built on the meta device: its modules and their names, no memory and no weights.

    Raises what `load_backbone` raises for an unknown arch (UnknownNameError) or a tag the arch
    does not have (ValueError), without reading or downloading anything.
    """
    source, name = _parse_arch(arch, "auto")
    with torch.device("meta"):
        model, _, _ = _BUILDERS[source](name, tag, None, False)
    return model


def check_backbone(settings: BackboneParams, *, weights: bool = True) -> nn.Module:
    """Check the `backbone` section before any work; return the architecture on the meta device.

    backbone.arch must name a model its library registers; backbone.weights (when `weights`) must
    be an existing file, '<tag>@<existing file>', a tag the arch has, or null; backbone.class_map
    an existing file or null. The arch is reported first: with an unknown arch, the weights say
    nothing. A UserError names the key.
    """
    arch_fix = "set it to '<source>:<name>' of a model its library has"
    weights_fix = "set it to an existing file, '<tag>@<file>', a tag of the arch (needs network) or null (random init)"
    with user_error_for("backbone.arch", settings.arch, catch=(UnknownNameError,), fix=arch_fix):
        _parse_arch(settings.arch, "auto")
    spec, missing = WeightsSpec(None, None), None
    if weights:
        try:
            spec = parse_weights(settings.weights)
        except ValueError as error:  # reported after the arch, which may be wrong too
            missing = error
    with user_error_for("backbone.weights", settings.weights, catch=(ValueError,), fix=weights_fix):
        with user_error_for("backbone.arch", settings.arch, catch=(UnknownNameError,), fix=arch_fix):
            skeleton = backbone_skeleton(settings.arch, spec.tag)
    if missing is not None:
        raise UserError(str(missing), key="backbone.weights", value=settings.weights, fix=weights_fix) from missing
    if settings.class_map is not None and not Path(settings.class_map).is_file():
        raise UserError("file not found", key="backbone.class_map", value=settings.class_map,
                        fix="set it to a CSV dataset_class,backbone_index, or null to map the classes by name")
    return skeleton


def load_backbone_checked(settings: BackboneParams, num_classes: int | None = None) -> LoadedBackbone:
    """`load_backbone` for the `backbone` section: what the user can fix is a UserError naming the key
    (an unknown arch: backbone.arch; a missing file, a checkpoint of another arch, weights
    unavailable offline: backbone.weights)."""
    with user_error_for("backbone.weights", settings.weights, catch=(ValueError, FileNotFoundError, WeightsUnavailableError)):
        with user_error_for("backbone.arch", settings.arch, catch=(UnknownNameError,)):
            return load_backbone(settings.arch, settings.weights, num_classes=num_classes)
