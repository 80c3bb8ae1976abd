"""Work the data cannot support (ground-truth masks on an image folder), said one way everywhere.

A stage whose work needs ground-truth masks still runs on data without them and writes every output
it declares (DVC requires each one), as a stub saying `skipped: <reason>`: metrics JSON
`{"skipped": reason}`, a plot CSV with its header only, text saying so; its summary line says it
too. Work of the same stage that needs no masks is done as always. `python -m stages doctor`
reports the same reasons before any work.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SKIPPED = "skipped"
SKIPPED_FILE = "SKIPPED"  # a skipped folder output holds only this file, with the reason
KINDS_WITH_MASKS = ("toy", "segfolder")  # data.kind values whose prepare stores ground-truth concept masks


def no_masks(kind: str) -> str | None:
    """Why work that needs ground-truth masks cannot run on data of `kind` (data.kind), or None when it can."""
    if kind in KINDS_WITH_MASKS:
        return None
    return f"data.kind {kind} has no ground-truth masks (toy and segfolder data have them)"


def no_renderer(kind: str) -> str | None:
    """Why counterfactual images (true concept effects) cannot be made for data of `kind`, or None: they
    need a scene renderer, which only the toy world has."""
    if kind == "toy":
        return None
    return f"data.kind {kind} has no scene renderer: counterfactual images exist only for the toy world"


def skipped(reason: str) -> dict[str, str]:
    """The metrics JSON of skipped work: {"skipped": reason}."""
    return {SKIPPED: reason}


def write_skipped_folder(path: Path, reason: str) -> None:
    """`path` as a folder holding only SKIPPED (the reason): a declared folder output of skipped work."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / SKIPPED_FILE).write_text(f"{SKIPPED}: {reason}\n")
