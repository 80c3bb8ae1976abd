"""`python -m stages doctor`: every stage's own checks at once, one plan line per stage, every problem one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lib.core.upstream import read_stages
from lib.pipeline.doctor import PLANS
from stages import doctor
from stages.__main__ import COMMANDS
from tests.stage_cli import invoke

REPO = Path(__file__).resolve().parents[1]
STAGES = list(read_stages(REPO / "dvc.yaml"))
# the image-folder params of docs/real-data.md (a photo folder, a torchvision ResNet-18 from a file)
PHOTOS = {
    "runtime": {"device": "cpu"},
    "data": {"kind": "imagefolder", "name": "photos", "image_size": 64,
             "imagefolder": {"root": "photos", "val_fraction": 0.25, "test_fraction": 0.25}},
    "backbone": {"arch": "torchvision:resnet18", "weights": "models/resnet18.pt"},
    "features": {"layers": ["layer2", "layer3"]},
    "cefam": {"layers": ["layer2", "layer3"]},
}


def _merge(base: dict, update: dict) -> dict:
    return {**base, **{k: _merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in update.items()}}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """dvc.yaml, params.yaml, the concept list and the toy models: what the doctor reads."""
    for name in ("dvc.yaml", "params.yaml", "concepts/toy.txt", "models/toy"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    return tmp_path


def _params(root: Path, update: dict) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(_merge(raw, update)))


def _lines(output: str) -> list[str]:
    return [" ".join(line.split()) for line in output.strip().splitlines()]


def test_the_doctor_has_every_stage_and_runs_the_check_its_command_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    table = doctor.checks()
    assert list(table) == STAGES and set(PLANS) == set(STAGES)  # a new dvc.yaml stage needs a row in both
    seen = {}

    def record(name, params, entry, *, check=None, **options):  # noqa: ANN001, ANN202
        seen[name.replace("-", "_")] = check

    for stage in STAGES:
        command = COMMANDS[read_stages(REPO / "dvc.yaml")[stage]["cmd"].split()[3]]
        module = __import__(command.__module__, fromlist=["_"])
        for runner in ("run_stage", "run_sharded_stage"):
            if hasattr(module, runner):
                monkeypatch.setattr(module, runner, record)
        command()
        assert seen.pop(stage) is table[stage], stage


def test_default_params_plan_every_stage_without_loading_weights(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the doctor loaded weights")

    monkeypatch.setattr(torch, "load", no_weights)
    result = invoke(project, "doctor")
    assert result.exit_code == 0, result.output
    lines = _lines(result.output)
    assert [line.split(":")[0] for line in lines[:-1]] == STAGES and lines[-1] == "no problems in params.yaml"
    plans = dict(line.split(": ", 1) for line in lines[:-1])
    assert plans["circles"] == "4200 images x 7x7 rings on toy-clip (cpu, " + plans["circles"].rsplit(", ", 1)[1]
    assert plans["prepare"] == "toy world: 3000 train / 600 val / 600 test images at 64 px, with ground-truth masks -> data/toy"
    assert plans["concepts"].startswith("23 concepts of concepts/toy.txt")
    assert "ground-truth matching skipped" not in plans["contributions"]


def test_image_folder_params_say_what_is_skipped(project: Path) -> None:
    _params(project, PHOTOS)
    for name in ("cat", "dog"):
        (project / "photos" / name).mkdir(parents=True)
    torch.save({}, project / "models" / "resnet18.pt")  # only its existence is checked
    result = invoke(project, "doctor")
    assert result.exit_code == 0, result.output
    plans = dict(line.split(": ", 1) for line in _lines(result.output)[:-1])
    reason = "data.kind imagefolder has no ground-truth masks (toy and segfolder data have them)"
    assert plans["evaluate"] == f"concept maps and segmentation skipped: {reason}; accuracy paths of the sparse layers kept"
    assert plans["contributions"].endswith(f"ground-truth matching skipped: {reason} (cpu)")
    assert plans["features"] == "the images of photos (2 class folders) through torchvision:resnet18 (models/resnet18.pt): " \
        "layer2, layer3 and logits (cpu, fp32)"
    assert plans["prepare"] == "the images of photos (2 class folders), val 25% / test 25% of each class, bad images: error, at 64 px, " \
        "no ground-truth masks -> data/photos"


def test_every_problem_is_one_line_and_a_shared_one_is_said_once(project: Path) -> None:
    _params(project, _merge(PHOTOS, {"runtime": {"device": "cuda:63"}, "concepts": {"file": "concepts/mine.txt"},
                                     "circles": {"width": 30.0}}))
    result = invoke(project, "doctor")
    assert result.exit_code == 2, result.output
    problems = [line.removeprefix("problem: ") for line in _lines(result.output) if line.startswith("problem: ")]
    expected = [
        "runtime: runtime.device: 'cuda:63' — ",
        "prepare: data.imagefolder.root: 'photos' — not a directory; ",
        "features, regions, sae_data, contributions, fact_explain: backbone.weights: 'models/resnet18.pt' — ",
        "circles: circles.width: 30.0 — ",
        "concepts: concepts.file: 'concepts/mine.txt' — ",
    ]
    assert len(problems) == len(expected) and all(p.startswith(e) for p, e in zip(problems, expected, strict=True)), problems
    assert _lines(result.output)[-1] == "5 problems in params.yaml"
    assert all(" — " in p and "; " in p for p in problems)  # key, value, what is wrong, and the fix


def test_an_invalid_params_file_is_one_error_naming_every_bad_key(project: Path) -> None:
    _params(project, {"circles": {"grid": 0}, "sparse": {"pooling": "mean"}})
    result = invoke(project, "doctor")
    assert result.exit_code == 2
    assert "circles.grid: 0" in result.output and "sparse.pooling: 'mean'" in result.output
