"""The manifest: one row per usable image (index into the stores, source, label, split).

Extra columns are kept (the toy world adds a global ``caption`` per image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.core.errors import UserError
from lib.core.layout import SPLITS

COLUMNS = ("index", "source", "label", "split")


def write_manifest(path: Path, frame: pd.DataFrame) -> None:
    """Validate and write the manifest as parquet (atomically: temp file then rename)."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}")
    bad_splits = sorted(set(frame["split"]) - set(SPLITS))
    if bad_splits:
        raise ValueError(f"manifest has unknown splits {bad_splits}; allowed: {list(SPLITS)}")
    tmp = path.with_suffix(".tmp")
    extra = [c for c in frame.columns if c not in COLUMNS]
    frame.loc[:, [*COLUMNS, *extra]].reset_index(drop=True).to_parquet(tmp, index=False)
    tmp.replace(path)


def read_manifest(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise UserError(f"{path}: manifest not found", fix="run the prepare stage first (dvc repro prepare)")
    return pd.read_parquet(path)


def split_indices(manifest: pd.DataFrame, split: str) -> np.ndarray:
    """Store row indices of one split, sorted (so reads stay shard-aligned)."""
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not one of {list(SPLITS)}")
    return np.sort(manifest.loc[manifest["split"] == split, "index"].to_numpy())


def write_dataset_info(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)


def read_dataset_info(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path}: dataset info not found", fix="run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())
