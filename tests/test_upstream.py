"""A stage run by hand before its upstream stops with one line naming the missing output and the stage that makes it.

The table of cases is dvc.yaml itself: every stage whose deps include another stage's outputs is run
through the CLI in a folder holding only dvc.yaml and params.yaml, so a stage added later is covered
without touching this file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lib.core.params import load_params
from lib.core.upstream import WHEN_PRESENT, Upstream, missing_message, missing_upstream, read_stages, upstream_of
from stages.__main__ import COMMANDS
from tests.stage_cli import invoke

REPO = Path(__file__).resolve().parents[1]
STAGES = read_stages(REPO / "dvc.yaml")
CONFIG = load_params(REPO / "params.yaml")
UPSTREAM = {name: [up for up in upstream_of(name, CONFIG, STAGES) if not up.optional] for name in STAGES}


def command(stage: str) -> list[str]:
    """The `python -m stages` arguments of a dvc.yaml stage's cmd."""
    words = STAGES[stage]["cmd"].split()
    assert words[:3] == ["python", "-m", "stages"], f"{stage}: cmd {STAGES[stage]['cmd']!r} is not a stage command"
    return words[3:]


def test_every_stage_runs_a_stage_command_and_most_read_another_stage_outputs() -> None:
    assert all(command(stage)[0] in COMMANDS for stage in STAGES)
    starts = {stage for stage, upstream in UPSTREAM.items() if not upstream}
    assert starts == {"prepare", "toy_backbone", "toy_clip"}  # the pipeline's roots make their inputs themselves
    # a dep inside another stage's output folder is found (features/logits.zarr is made by features)
    assert Upstream("data/toy/features/logits.zarr", "features") in UPSTREAM["salf_stats"]
    # the stages read only when present are real producers of the reader's deps (the table cannot rot)
    for reader, makers in WHEN_PRESENT.items():
        assert makers <= {up.stage for up in upstream_of(reader, CONFIG, STAGES) if up.optional}, reader


@pytest.mark.parametrize("stage", [stage for stage, upstream in UPSTREAM.items() if upstream])
def test_a_stage_before_its_upstream_names_the_missing_output_and_its_maker(stage: str, tmp_path: Path) -> None:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    result = invoke(tmp_path, *command(stage))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    first = UPSTREAM[stage][0]
    assert f"{stage}: {first.path} is missing — run `dvc repro {first.stage}` (stage {first.stage} makes it)" in lines[0]
    assert all(f"{up.path} ({up.stage})" in lines[0] for up in UPSTREAM[stage][1:])


def test_only_the_outputs_that_do_not_exist_are_named(tmp_path: Path) -> None:
    """contributions with every upstream output present but FaCT's SAE: the line names the SAE alone."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    sae = Upstream("data/toy/fact/sae.pt", "sae")
    assert sae in UPSTREAM["contributions"]
    for up in UPSTREAM["contributions"]:
        if up != sae:
            (tmp_path / up.path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / up.path).touch()
    result = invoke(tmp_path, "contributions")
    assert result.exit_code == 2, result.output
    assert " ".join(result.output.split()) == f"error: {missing_message('contributions', [sae])}"


def test_evaluate_and_stats_run_by_hand_without_the_methods_not_run_yet(tmp_path: Path) -> None:
    """Their method inputs are optional (WHEN_PRESENT): with the required ones present, none is named."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    required = {up.path for stage in WHEN_PRESENT for up in UPSTREAM[stage]}
    for path in sorted(required):  # a path another one lies under (data/toy/features) is a folder
        if any(other.startswith(path + "/") for other in required):
            (tmp_path / path).mkdir(parents=True, exist_ok=True)
        else:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).touch()
    for stage in WHEN_PRESENT:
        assert missing_upstream(stage, CONFIG, tmp_path / "dvc.yaml") == []
        assert any(up.optional and not (tmp_path / up.path).exists() for up in upstream_of(stage, CONFIG, STAGES))
