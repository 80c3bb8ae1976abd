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


def train_val_indices(manifest: pd.DataFrame, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train rows, val rows, carved): the manifest's train and val splits, or, when it has no val
    split (e.g. segfolder data), a seeded `val_fraction` of train carved out as val, so no choice
    ever looks at the test split. ValueError when either would be empty."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = split_indices(manifest, "train"), split_indices(manifest, "val")
    carved = len(val) == 0
    if carved:
        chosen = np.zeros(len(train), dtype=bool)
        chosen[np.random.default_rng(seed).choice(len(train), size=round(val_fraction * len(train)), replace=False)] = True
        train, val = train[~chosen], train[chosen]
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{len(train)} train and {len(val)} val images: both splits need images (add images or change val_fraction)")
    return train, val, carved


def write_dataset_info(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)


def read_dataset_info(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path}: dataset info not found", fix="run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())
