"""Every error a user can fix, through the CLI: exit status 2, one to three lines naming the params key,
the bad value and the fix, no traceback, nothing written, in seconds (issue 17; issue 15 item 4).

Each case changes one thing of a working toy project and runs the stage it concerns. Most fail in
the validation step (`check=` of run_stage: before any model or data is loaded); the offline tags,
a checkpoint of another arch and a too-large image fail where the library raises, converted there.
"""

from __future__ import annotations

import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from lib.models import weights
from lib.models.weights import save_backbone
from lib.toy.models.cnn import build_toy, toy_preprocess
from stages.__main__ import app

TOY_CNN = "models/toy/cnn.pt"


@dataclass(frozen=True)
class Case:
    stage: str
    params: dict[str, dict[str, Any]]  # section -> keys set on top of the working params
    shows: tuple[str, ...]  # what the message must say: the dotted key and the bad value (as repr), ...
    offline: bool = False  # downloads fail as without network (the libraries' caches empty)
    decodes: bool = False  # fails while decoding images: the image store's scratch area (data/<name>/.partial) exists


# a working project: toy_inputs with a toy CNN checkpoint (and, below, image folders and lists)
BASE = {"backbone": {"arch": "toy:cnn", "weights": TOY_CNN}, "features": {"layers": ["layer3"]}}
REAL = {"kind": "imagefolder", "name": "real", "image_size": 16}
VIT = {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
BCOS = {"backbone": {"arch": "bcos:resnet18", "weights": "DEFAULT"}, "features": {"layers": ["net.layer3"]}}  # layers under its wrapper

CASES = {
    # issue 17's five rows
    "clip tag offline": Case("clip-images", {"clip": VIT}, ("clip.pretrained: 'laion2b_s34b_b79k'", "laion2b_s34b_b79k@/path/to/"),
                             offline=True),
    "grid larger than the CLIP input": Case("circles", {"circles": {"grid": 100}}, ("circles.grid: 100", "64 px")),
    "layer that does not exist": Case("features", {"features": {"layers": ["layer99"]}}, ("features.layers: 'layer99'", "closest: layer")),
    "arch that does not exist": Case("features", {"backbone": {"arch": "torchvision:resnet999"}},
                                     ("backbone.arch: 'torchvision:resnet999'", "unknown torchvision classification model 'resnet999'")),
    "concept file missing": Case("concepts", {"concepts": {"file": "missing.txt"}}, ("concepts.file: 'missing.txt'", "No such file")),
    # schema (load_params)
    "negative radius": Case("circles", {"circles": {"radius": -3}}, ("circles.radius: -3", "greater than 0")),
    "unknown key": Case("circles", {"circles": {"gird": 5}}, ("circles.gird: 5", "unknown key")),
    "invalid YAML": Case("circles", {}, ("not valid YAML at line 2, column 1",)),
    "duplicate concept": Case("concepts", {"concepts": {"file": "concepts/dup.txt"}},
                              ("concepts.file: 'concepts/dup.txt'", "line 3: duplicate concept 'red' (first on line 1)")),
    # other checks before any work
    "ring radius beyond the image": Case("circles", {"circles": {"radius": 200.0}}, ("circles.radius: 200.0", "too large")),
    "unknown CLIP model": Case("clip-images", {"clip": {"model": "ViT-B-99", "pretrained": None}}, ("clip.model: 'ViT-B-99'", "ViT-B-32")),
    "unknown CLIP tag": Case("circles", {"clip": {"model": "ViT-B-32", "pretrained": "no-such-tag"}},
                             ("clip.pretrained: 'no-such-tag'", "valid: ")),
    "unknown weights tag": Case("features", {"backbone": {"arch": "torchvision:resnet18", "weights": "IMAGENET1K_V9"}},
                                ("backbone.weights: 'IMAGENET1K_V9'", "IMAGENET1K_V1")),
    "missing weights file": Case("features", {"backbone": {"weights": "models/toy/missing.pt"}},
                                 ("backbone.weights: 'models/toy/missing.pt'", "not found")),
    "class map file missing": Case("features", {"backbone": {"class_map": "missing.csv"}},
                                   ("backbone.class_map: 'missing.csv'", "not found")),
    "unknown CAM layer": Case("evaluate", {"evaluate": {"cam_layer": "layer9"}}, ("evaluate.cam_layer: 'layer9'", "closest: layer")),
    "no such GPU": Case("similarity", {"runtime": {"device": "cuda:99"}}, ("runtime.device: 'cuda:99'", "set it to")),
    # where the library raises (converted at the boundary)
    "checkpoint of another arch": Case("features", {"backbone": {"arch": "toy:bcos"}},
                                       ("backbone.weights: 'models/toy/cnn.pt'", "holds a toy:cnn checkpoint, not toy:bcos")),
    "torchvision tag offline": Case("features", {"backbone": {"arch": "torchvision:resnet18", "weights": "IMAGENET1K_V1"}},
                                    ("backbone.weights: 'IMAGENET1K_V1'", "IMAGENET1K_V1@/path/to/resnet18-"), offline=True),
    "timm tag offline": Case("features", {"backbone": {"arch": "timm:resnet18", "weights": "a1_in1k"}},
                             ("backbone.weights: 'a1_in1k'", "huggingface.co cannot be reached", "a1_in1k@/path/to/"), offline=True),
    "bcos tag offline": Case("features", BCOS,
                             ("backbone.weights: 'DEFAULT'", "DEFAULT@/path/to/"), offline=True),
    # issue 15 item 4: real image folders and lists
    "image folder with one class": Case("prepare", {"data": {**REAL, "imagefolder": {"root": "one_class"}}},
                                        ("data.imagefolder.root: 'one_class'", "1 class folder(s) (cat)", "at least 2")),
    "image folder with an empty class": Case("prepare", {"data": {**REAL, "imagefolder": {"root": "empty_class"}}},
                                             ("data.imagefolder.root: 'empty_class'", "class folders without images", "dog")),
    "image root missing": Case("prepare", {"data": {**REAL, "imagefolder": {"root": "nowhere"}}},
                               ("data.imagefolder.root: 'nowhere'", "not a directory")),
    "list file with a class never in train": Case("prepare", {"data": {**REAL, "imagefolder": {"list_file": "test_only.csv"}}},
                                                  ("data.imagefolder.list_file: 'test_only.csv'", "classes without a train image: dog")),
    "list file with an unknown split": Case("prepare", {"data": {**REAL, "imagefolder": {"list_file": "valid.csv"}}},
                                            ("data.imagefolder.list_file: 'valid.csv'", "unknown split values ['valid']")),
    "list file with unknown columns": Case("prepare", {"data": {**REAL, "imagefolder": {"list_file": "list.csv"}}},
                                           ("data.imagefolder.list_file: 'list.csv'", "'spilt' (did you mean 'split'?)")),
    "image over max_pixels": Case("prepare", {"data": {**REAL, "imagefolder": {"root": "two_classes", "max_pixels": 100}}},
                                  ("data.imagefolder.max_pixels: 100", "20x20 image", "null means no limit"), decodes=True),
}


@pytest.fixture(scope="module")
def project(toy_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """toy_inputs with BASE params, a toy CNN checkpoint, image folders (one class; an empty class;
    two classes of 20 x 20 images), list files (a misspelt column, a class only in test, an unknown split)
    and a concept list with a duplicate."""
    import shutil

    root = tmp_path_factory.mktemp("errors") / "project"
    shutil.copytree(toy_inputs, root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**raw, **BASE}))
    save_backbone(root / TOY_CNN, build_toy("cnn", 8), "toy:cnn", 8, toy_preprocess("cnn"))
    pixels = Image.fromarray(np.full((20, 20, 3), 128, np.uint8))
    for folder, classes in (("one_class", ("cat",)), ("empty_class", ("cat", "dog")), ("two_classes", ("cat", "dog"))):
        for name in classes:
            (root / folder / name).mkdir(parents=True)
            if (folder, name) != ("empty_class", "dog"):
                pixels.save(root / folder / name / "0.png")
    (root / "list.csv").write_text("path,label,spilt\ntwo_classes/cat/0.png,cat,train\ntwo_classes/dog/0.png,dog,train\n")
    (root / "test_only.csv").write_text("path,label,split\ntwo_classes/cat/0.png,cat,train\ntwo_classes/dog/0.png,dog,test\n")
    (root / "valid.csv").write_text("path,label,split\ntwo_classes/cat/0.png,cat,train\ntwo_classes/dog/0.png,dog,valid\n")
    (root / "concepts" / "dup.txt").write_text("red\tcolor\nstar\tshape\nred\tcolor\n")
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Downloads fail as they do without network, whatever this machine's network and caches."""

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)  # torchvision, B-cos
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # timm, open_clip
    monkeypatch.setattr(weights, "hub_unreachable", lambda: "huggingface.co")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime in ns, size) of every file and folder under `root`: any write shows."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_naming_key_value_and_fix(name: str, project: Path, enter_copy, set_params, request) -> None:
    case = CASES[name]
    root = enter_copy(project)
    for section, values in case.params.items():
        set_params(root / "params.yaml", section, **values)
    if name == "invalid YAML":
        (root / "params.yaml").write_text("circles:\n\tgrid: 3\n")
    if case.offline:
        request.getfixturevalue("offline")
    before = snapshot(root)

    start = time.perf_counter()
    result = CliRunner().invoke(app, [case.stage, "--params", "params.yaml"])
    seconds = time.perf_counter() - start

    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, f"{name}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert 1 <= len(lines) <= 3 and "Traceback" not in result.output, result.output
    message = " ".join(line for line in lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")):])
    for part in case.shows:
        assert part in message, f"{part!r} not in {message!r}"
    assert seconds < 10, f"{name} took {seconds:.1f} s"
    after = snapshot(root)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    if case.decodes:  # decoding is the work: only the image store's scratch area (and the folder holding it) exists
        changed = [p for p in changed if not p.startswith("data/real/.partial") and p not in ("data", "data/real")]
    assert not changed, f"{name} wrote or touched {changed}"


def test_max_pixels_default_is_the_decoders():
    from lib.core.params import ImageFolderParams, SegFolderParams
    from lib.data.decode import DEFAULT_MAX_PIXELS

    assert ImageFolderParams(root="x").max_pixels == SegFolderParams(root="x").max_pixels == DEFAULT_MAX_PIXELS
