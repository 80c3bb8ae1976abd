"""dvc.yaml's deps cover exactly the code each stage runs, and the rooms of lib/ keep their import rules.

A stage's code is the transitive closure of project imports (module-level and function-level,
read from the source, not executed) of the module that defines its command. A cached DAG is only
right when every module of that closure is under one of the stage's deps, and it re-runs needlessly
when a dep holds code the stage never runs.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Modules that cannot change any stage's output, so stages need not depend on them (one line why).
NOT_OUTPUT_CODE = {
    "stages/__main__.py",  # the command table: names commands, computes nothing
}
# Per stage: the toy models train for half an hour and are shipped in git. They read their params
# through the schema, but their values come from params.yaml, which DVC tracks key by key
# (`params:`); adding another stage's section to the schema must not retrain them.
NOT_OUTPUT_CODE_OF = dict.fromkeys(("toy-backbone", "toy-clip", "toy-report"), {"lib/core/params.py"})


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


@cache
def direct_imports(file: Path) -> frozenset[Path]:
    """Project files `file` imports anywhere (functions included; TYPE_CHECKING blocks excluded),
    with the package __init__ files importing them runs."""
    tree = ast.parse(file.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found: set[Path] = set()
    for name in names:
        if name.split(".")[0] not in ("lib", "stages"):
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            module = _module_file(".".join(parts[:i]))
            if module is not None:
                found.add(module)
    return frozenset(found - {file})


def closure(file: Path) -> set[Path]:
    """Every project file that running `file`'s code may import."""
    seen, todo = set(), [file]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(direct_imports(current))
    return seen


def _is_code(path: Path) -> bool:
    """A file that runs: Python, not a docstring-only package marker (data files a stage reads are deps, not code)."""
    if path.suffix != ".py":
        return False
    body = ast.parse(path.read_text()).body
    return not (path.name == "__init__.py" and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body))


def stage_code(command: str) -> set[str]:
    """Project files (relative paths) run by `python -m stages <command>`."""
    from stages.__main__ import COMMANDS

    module = Path(COMMANDS[command].__code__.co_filename)
    return {str(p.relative_to(ROOT)) for p in closure(module) if _is_code(p)} - NOT_OUTPUT_CODE - NOT_OUTPUT_CODE_OF.get(command, set())


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if d.startswith(("lib/", "stages/"))]


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _command(stage: dict) -> str:
    match = re.fullmatch(r"python -m stages ([\w-]+)", stage["cmd"])
    assert match, f"stage cmd {stage['cmd']!r} is not `python -m stages <command>`"
    return match.group(1)


@pytest.mark.parametrize("name", sorted(_stages()))
def test_deps_cover_every_module_the_stage_runs(name):
    stage = _stages()[name]
    missing = sorted(f for f in stage_code(_command(stage)) if not _covered(f, code_deps(stage)))
    assert not missing, f"dvc.yaml stage {name!r} runs {missing} but does not list them in deps"


@pytest.mark.parametrize("name", sorted(_stages()))
def test_no_stage_depends_on_code_it_does_not_run(name):
    stage = _stages()[name]
    runs = stage_code(_command(stage))
    unused = []
    for dep in code_deps(stage):
        if dep == "lib/core":  # the shared plumbing is listed whole (dvc.yaml header)
            continue
        path = ROOT / dep
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        unused += [str(f.relative_to(ROOT)) for f in files if _is_code(f) and str(f.relative_to(ROOT)) not in runs]
    assert not unused, f"dvc.yaml stage {name!r} depends on {unused}, which it never runs"


STORE_CODE = {"lib/core/stores.py", "lib/core/streams.py", "lib/core/distributed.py", "lib/core/sharded_stage.py"}


@pytest.mark.parametrize("name", ["toy_backbone", "toy_clip"])
def test_toy_training_stages_do_not_run_the_store_code(name):
    """Their weights are shipped in git and reproduce only to their metrics, not their bytes (README):
    an edit of the store plumbing, which they never need, must not make `dvc repro` retrain them."""
    assert not STORE_CODE & stage_code(_command(_stages()[name]))


def test_an_unlisted_import_is_caught(tmp_path, monkeypatch):
    """The check itself: a stage module importing a module outside its deps is reported."""
    stage = tmp_path / "stages" / "probe_stage.py"
    stage.parent.mkdir()
    stage.write_text("def run():\n    from lib.kernels.cam import cam_maps\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "lib" / "kernels").mkdir(parents=True)
    (tmp_path / "lib" / "kernels" / "cam.py").write_text("import torch\n")
    files = {str(p.relative_to(tmp_path)) for p in closure(stage)}
    assert "lib/kernels/cam.py" in files
    assert not _covered("lib/kernels/cam.py", ["stages/probe_stage.py", "lib/core"])


# ------------------------------------------------------------------------------------------------
# Import rules of the rooms (README "Architecture")
ROOMS = ("core", "kernels", "models", "data", "pipeline", "methods", "evaluate", "metrics", "stats", "toy", "compare")
# Which rooms each room may import (besides itself). toy is reached only through the model
# registry (lib/models/backbones.py) and the data it generates (lib/data/prepare.py, preview.py).
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "metrics": {"core"},
    "models": {"core", "kernels"},
    "data": {"core", "kernels", "models"},
    "pipeline": {"core", "kernels", "models", "data"},
    "methods": {"core", "kernels", "models", "data", "pipeline", "metrics"},
    "evaluate": {"core", "kernels", "models", "data", "pipeline", "methods", "metrics"},
    "stats": {"core", "data", "metrics"},  # reads the methods' stores (lib/core/schema.py), never their code
    "toy": {"core", "kernels", "models", "data", "pipeline", "metrics"},
    # the methods side by side against exact truth: counterfactual images need the toy world's renderer
    "compare": {"core", "kernels", "models", "data", "pipeline", "methods", "evaluate", "metrics", "toy"},
}
TOY_GATES = {"lib/models/backbones.py", "lib/data/prepare.py", "lib/data/preview.py"}


def _room(path: Path) -> str | None:
    parts = path.relative_to(ROOT).parts
    return parts[1] if parts[0] == "lib" and len(parts) > 2 else None


def _lib_files() -> list[Path]:
    return sorted((ROOT / "lib").rglob("*.py"))


def test_every_lib_module_is_in_a_room():
    loose = [str(p.relative_to(ROOT)) for p in _lib_files() if p.parent == ROOT / "lib" and p.name != "__init__.py"]
    assert not loose and {p.name for p in (ROOT / "lib").iterdir() if p.is_dir() and p.name != "__pycache__"} <= set(ROOMS)


@pytest.mark.parametrize("room", ROOMS)
def test_room_import_rules(room):
    broken = []
    for file in _lib_files():
        if _room(file) != room:
            continue
        for target in direct_imports(file):
            other = _room(target)
            if other is None or other == room:
                if room == "methods" and other == "methods":  # a method never imports another method
                    mine, theirs = file.relative_to(ROOT).parts[2], target.relative_to(ROOT).parts[2]
                    if mine != theirs and theirs != "__init__.py":
                        broken.append(f"{file.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
                continue
            rel = str(file.relative_to(ROOT))
            if other == "toy" and rel in TOY_GATES:
                continue
            if other not in ALLOWED[room]:
                broken.append(f"{rel} -> {target.relative_to(ROOT)}")
    assert not broken, f"lib/{room} breaks the import rules: {broken}"
