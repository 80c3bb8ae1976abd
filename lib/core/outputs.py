"""Atomic writers for every small output (JSON metrics, plot CSVs, tables, figures, text, torch files).

Each writes a temp file beside the target and renames it, so a crash never leaves half a file
that DVC or a reader could take for a finished one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temp path beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def json_safe(value: Any, digits: int | None = None) -> Any:
    """NaN -> None throughout (strict JSON and dvc metrics have no NaN); floats optionally rounded."""
    if isinstance(value, dict):
        return {k: json_safe(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, digits) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else (round(value, digits) if digits is not None else value)
    return value


def write_json(path: Path, data: Any, digits: int | None = None) -> None:
    write_text(path, json.dumps(json_safe(data, digits), indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_text(path, frame.to_csv(index=False, float_format="%.6g"))


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_figure(path: Path, figure: Figure, dpi: int = 100) -> None:
    write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".")))
