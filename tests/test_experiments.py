"""DVC experiments end to end: repro a micro toy config, commit, `dvc exp run -S`, compare.

Runs the real `dvc` CLI on a copy of the project's source files in a fresh git repository (no
network: analytics are off in .dvc/config and by environment). Targets the evaluate stage and
whatever it depends on; stages that join its upstream add their micro settings to MICRO.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
# produced by the pipeline, never copied: the copy must rebuild them
GENERATED = ("data/", "models/", "metrics/", "dvc.lock")
# every stage upstream of evaluate, the toy models included, at a size that runs in seconds
MICRO = {
    "runtime": {"device": "cpu"},
    "data": {"image_size": 32, "rows_per_shard": 16, "toy": {"n_train": 32, "n_val": 16, "n_test": 32}},
    "toy_backbone": {"image_size": 32, "n_train": 64, "n_val": 16, "cnn": {"epochs": 1}, "bcos": {"epochs": 1}},
    "toy_clip": {"image_size": 32, "n_train": 64, "n_val": 8, "steps": 4, "batch_size": 8, "eval_every": 4, "warmup": 1},
    "circles": {"grid": 3},
    "concepts": {"min_top5_similarity": -1.0},  # a 4-step CLIP's similarities are meaningless
    "cbl": {"max_steps": 10, "eval_every": 5, "cos3_threshold": -1.0},
    "sparse": {"n_lambdas": 4, "max_epochs": 5},
    "evaluate": {"batch_size": 16, "steps": 21, "cam_methods": ["gradcam"]},
    "cefam": {"translator": {"max_epochs": 3, "batch_size": 16}, "regions": {"batch_size": 16, "n_figures": 1, "contribution_concepts": 2}},
    "fact": {
        "sae": {"expansion": 0.125, "k": 2, "aux_k": 4, "epochs": 1, "warmup_epochs": 0.2, "decay_epochs": 0.2, "batch_size": 64,
                "checkpoint_every": 5},
        "c2": {"max_concepts": 2},
    },
}


def _merge(base: dict, update: dict) -> dict:
    return {**base, **{k: _merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in update.items()}}


def _run(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _copy_project(target: Path, skip: tuple[str, ...] = GENERATED) -> None:
    """The project's files (tracked and untracked-not-ignored) into `target`, but for paths starting with `skip`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in listed:
        source = PROJECT / name
        if name.startswith(skip) or not source.is_file():  # deleted-but-tracked files are listed too
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)


def _micro_repo(tmp_path: Path) -> Path:
    """A git repository holding the project's sources with the MICRO params, not yet reproduced."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, MICRO), sort_keys=False))
    _run(repo, "git", "init", "-q")
    return repo


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_exp_run_changes_the_metrics(tmp_path: Path) -> None:
    repo = _micro_repo(tmp_path)
    _run(repo, "dvc", "repro", "evaluate")
    baseline = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert {"random", "centre", "gradcam", "salf", "fact"} <= set(baseline["segmentation"])
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "micro baseline")

    # the random baseline's seed: a cheap change that must move its scores
    _run(repo, "dvc", "exp", "run", "-S", "evaluate.seed=1", "evaluate")
    diff = json.loads(_run(repo, "dvc", "metrics", "diff", "--json"))["metrics/evaluate.json"]
    nra = diff["concept_maps.random.avg.nra"]
    assert nra["old"] == baseline["concept_maps"]["random"]["avg"]["nra"] and nra["new"] != nra["old"]
    assert "segmentation.centre.miou" not in diff  # the centre prior does not depend on the seed

    rows = json.loads(_run(repo, "dvc", "exp", "show", "--json"))
    experiments = [e for row in rows for e in (row.get("experiments") or [])]
    values = [
        r["data"]["metrics"]["metrics/evaluate.json"]["data"]["concept_maps"]["random"]["avg"]["nra"]
        for e in experiments
        for r in e["revs"]
        if r["data"]["params"]["params.yaml"]["data"]["evaluate"]["seed"] == 1
    ]
    assert values == [nra["new"]]



@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_returning_to_a_configuration_restores_every_stage_from_the_run_cache(tmp_path: Path) -> None:
    """A, B, A again: the third run restores every stage from DVC's run-cache (no persist outs;
    metrics and plots declared as such) instead of re-running it, and gives A's outputs."""
    repo = _micro_repo(tmp_path)
    _run(repo, "dvc", "repro", "evaluate")
    baseline = json.loads((repo / "metrics" / "evaluate.json").read_text())
    ran_stages = re.compile(r"Running stage '(\w+)'")

    def round_trip(change, undo, expected: set[str]) -> None:
        change()
        ran = set(ran_stages.findall(_run(repo, "dvc", "repro", "evaluate")))
        assert expected <= ran and not ran & {"circles", "clip_images", "features"}, ran
        undo()
        back = _run(repo, "dvc", "repro", "evaluate")
        assert not ran_stages.findall(back), back
        assert all(f"Stage '{stage}' is cached - skipping run" in back for stage in ran), back
        assert json.loads((repo / "metrics" / "evaluate.json").read_text()) == baseline

    # a concept out, another in, then the list put back (git checkout would do the same)
    concepts = repo / "concepts" / "toy.txt"
    original = concepts.read_text()
    edited = original.replace("\nblue\tcolor", "\nteal\tcolor")
    assert edited != original
    round_trip(lambda: concepts.write_text(edited), lambda: concepts.write_text(original), {"concepts"})
    # a params round trip, as `dvc exp run -S` makes them
    params = repo / "params.yaml"
    text = params.read_text()
    seeded = yaml.safe_dump(_merge(yaml.safe_load(text), {"cbl": {"seed": 1}}), sort_keys=False)
    round_trip(lambda: params.write_text(seeded), lambda: params.write_text(text), {"cbl", "sparse", "evaluate"})
