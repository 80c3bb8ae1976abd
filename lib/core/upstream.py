"""What a stage reads that another stage makes, from dvc.yaml: checked before a stage run by hand does any work.

`dvc repro` runs a stage's upstream first; `python -m stages <stage>` does not. So that a stage run
before its upstream stops with one line naming the missing output and the stage that makes it (not
a FileNotFoundError deep inside), `check_upstream` reads the stage's deps from dvc.yaml, keeps those
that are (inside) another stage's outs, metrics or plots, and reports the ones that do not exist.
dvc.yaml is the one source: a new stage or dep is covered without listing it here. The one
exception is WHEN_PRESENT: stages built to use a method's outputs only when they exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from lib.core.errors import UserError
from lib.core.params import Params

DVC_FILE = Path("dvc.yaml")  # stages run from the project root, where dvc.yaml is
_VARIABLE = re.compile(r"\$\{([^}]+)\}")
_OUTPUT_KINDS = ("outs", "metrics", "plots")
# reader stage -> the stages whose outputs it uses only when they exist (a method not run yet is left
# out by design, so these stages also run by hand on part of the pipeline)
WHEN_PRESENT = {
    "evaluate": frozenset({"cbl", "sparse", "regions", "sae", "contributions"}),  # lib/evaluate/registry.py: factories
    "stats": frozenset({"salf_stats", "regions", "contributions"}),  # lib/stats/stage.py: one store per method
    "counterfactuals": frozenset({"cbl", "sparse", "sae"}),  # lib/compare/explained_models.py: the models that exist
    "compare": frozenset({"cbl", "sparse", "regions", "sae", "contributions", "evaluate", "stats"}),  # lib/compare/stage.py
}


@dataclass(frozen=True)
class Upstream:
    """A dep of a stage that another stage makes: `path` (as the dep names it) and that `stage`;
    `optional` when the reader uses it only if it exists (WHEN_PRESENT)."""

    path: str
    stage: str
    optional: bool = False


def _paths(entries: list[Any] | None) -> list[str]:
    """The paths of a dvc.yaml list whose items are a path or {path: options}."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries or []]


@cache
def _read(dvc_file: Path, mtime: float) -> dict[str, dict[str, Any]]:
    return (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})


def read_stages(dvc_file: Path = DVC_FILE) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages (name -> definition, ${...} not yet resolved); {} when there is no dvc.yaml."""
    if not dvc_file.is_file():
        return {}
    return _read(dvc_file, dvc_file.stat().st_mtime)


def resolve(text: str, config: Params) -> str:
    """`text` with every ${dotted.key} replaced by its params value, as DVC interpolates dvc.yaml."""
    values = config.model_dump(mode="json")

    def lookup(match: re.Match[str]) -> str:
        value: Any = values
        for part in match.group(1).strip().split("."):
            value = value[part]
        return str(value)

    return _VARIABLE.sub(lookup, text)


def stage_outputs(definition: dict[str, Any]) -> list[str]:
    """Every output path a stage declares: outs, metrics and plots (unresolved)."""
    return [path for kind in _OUTPUT_KINDS for path in _paths(definition.get(kind))]


def _inside(path: str, output: str) -> bool:
    """Whether `path` is `output` or lies under it."""
    return path == output or PurePosixPath(output) in PurePosixPath(path).parents


def upstream_of(stage: str, config: Params, stages: dict[str, dict[str, Any]]) -> list[Upstream]:
    """The deps of `stage` (in dvc.yaml's order) that another stage's outputs hold, each with that stage."""
    producers = [(resolve(out, config), name) for name, definition in stages.items() if name != stage
                 for out in stage_outputs(definition)]
    found = []
    for dep in _paths(stages[stage].get("deps")):
        path = resolve(dep, config)
        maker = next((name for output, name in producers if _inside(path, output)), None)
        if maker is not None:
            found.append(Upstream(path, maker, maker in WHEN_PRESENT.get(stage, ())))
    return found


def missing_upstream(stage: str, config: Params, dvc_file: Path = DVC_FILE) -> list[Upstream]:
    """The upstream outputs `stage` needs (not optional) that do not exist (relative to dvc.yaml's folder); [] for a
    stage dvc.yaml does not have (probe, intervene) or without a dvc.yaml."""
    stages = read_stages(dvc_file)
    if stage not in stages:
        return []
    return [up for up in upstream_of(stage, config, stages) if not up.optional and not (dvc_file.parent / up.path).exists()]


def missing_message(stage: str, missing: list[Upstream]) -> str:
    """One line: the first missing output and the stage that makes it, then the others."""
    first = missing[0]
    text = f"{stage}: {first.path} is missing — run `dvc repro {first.stage}` (stage {first.stage} makes it)"
    if len(missing) > 1:
        text += "; also missing: " + ", ".join(f"{up.path} ({up.stage})" for up in missing[1:])
    return text


def check_upstream(stage: str, config: Params, dvc_file: Path = DVC_FILE) -> None:
    """Raise a UserError when an output of another stage that `stage` reads does not exist yet."""
    missing = missing_upstream(stage, config, dvc_file)
    if missing:
        raise UserError(missing_message(stage, missing))


def dvc_stage_name(command: str) -> str:
    """The dvc.yaml stage of a `python -m stages` command (sae-data -> sae_data)."""
    return command.replace("-", "_")
