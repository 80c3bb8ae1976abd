"""Helpers for tests that run stage commands in a project folder, as `python -m stages` would."""

import os
from pathlib import Path

import yaml
from typer.testing import CliRunner

from stages.__main__ import app


def invoke(root: Path, *args: str):
    """Run the stage command `args` in `root` with its params.yaml (params paths are relative to the
    working directory); returns typer's Result."""
    cwd = Path.cwd()
    try:
        os.chdir(root)
        return CliRunner().invoke(app, [*args, "--params", "params.yaml"])
    finally:
        os.chdir(cwd)


def merge_params(root: Path, **sections: dict) -> None:
    """Merge each section's keys into `root`/params.yaml (top-level keys of a section are replaced)."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
