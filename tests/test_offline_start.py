"""A real-data profile never retrains the shipped toy models: their stages depend on their own image size.

Runs the real `dvc status` on a copy of the project (sources, dvc.lock and the shipped toy models)
in a fresh git repository, with profiles/imagenet.yaml applied as `dvc exp run` would apply it.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_experiments import _copy_project, _run

TOY_STAGES = ("toy_backbone", "toy_clip", "toy_report")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's files as a fresh clone has them (no data/), committed to a new git repository."""
    repo = tmp_path_factory.mktemp("shipped")
    _copy_project(repo, skip=("data/",))
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "shipped")
    return repo


def _apply(repo: Path, profile: Path, *extra: str) -> None:
    """Set params.yaml as `python -m lib.core.profile <profile> | xargs dvc exp run` does (-S overrides)."""
    from dvc.utils.hydra import apply_overrides

    _run(repo, "git", "checkout", "-q", "params.yaml")
    printed = subprocess.run([sys.executable, "-m", "lib.core.profile", str(profile)], cwd=repo, capture_output=True, text=True, check=True)
    args = shlex.split(printed.stdout)
    apply_overrides(repo / "params.yaml", [*args[1::2], *extra])


def _changed(repo: Path) -> set[str]:
    return set(json.loads(_run(repo, sys.executable, "-m", "dvc", "status", "--json", *TOY_STAGES) or "{}"))


def test_the_imagenet_profile_leaves_the_toy_model_stages_up_to_date(shipped: Path) -> None:
    assert _changed(shipped) == set()  # the shipped weights match dvc.lock
    profile = shipped / "profiles" / "imagenet.yaml"
    _apply(shipped, profile)
    params = yaml.safe_load((shipped / "params.yaml").read_text())
    assert params["data"]["image_size"] != params["toy_backbone"]["image_size"]  # the profile does change the data's size
    assert _changed(shipped) == set()
    # the check can fail: a toy model's own image size does retrain it (and rescores the report)
    _apply(shipped, profile, "toy_backbone.image_size=48")
    assert _changed(shipped) == {"toy_backbone", "toy_report"}
