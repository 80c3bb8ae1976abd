"""Writing the evaluation: metrics JSON (dvc metrics), plot CSVs (dvc plots) and a Markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from lib.evaluate.run import Evaluation
from lib.evaluate.scoring import SEGMENTATION_KEYS
from lib.layout import Layout
from lib.metrics.spatial import AVERAGE_KEY

CONCEPT_KEYS = ("nra", "epg", "hit")
HEADERS = {"nra": "NRA", "epg": "EPG", "hit": "Hit rate", "pixel_acc": "pixel acc", "miou": "mIoU", "map": "mAP"}


def _json_safe(value: Any) -> Any:
    """Nested dicts with NaN replaced by None (strict JSON has no NaN) and floats rounded."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)  # 6 decimals: readable diffs, far below the noise
    return value


def metrics_dict(evaluation: Evaluation) -> dict[str, Any]:
    """{"concept_maps": {METHOD: {"avg": {...}, TYPE: {...}}}, "segmentation": {METHOD: {...}}}."""
    return _json_safe({"concept_maps": evaluation.concept_maps, "segmentation": evaluation.segmentation})


def summary_table(evaluation: Evaluation) -> str:
    """Markdown table, one row per method: the concept-map averages and the segmentation scores."""
    methods = list(dict.fromkeys([*evaluation.concept_maps, *evaluation.segmentation]))
    columns = [*CONCEPT_KEYS, *SEGMENTATION_KEYS]

    def cell(method: str, key: str) -> str:
        group = evaluation.concept_maps.get(method, {}).get(AVERAGE_KEY, {}) if key in CONCEPT_KEYS else evaluation.segmentation.get(method, {})
        value = group.get(key)
        return "–" if value is None or math.isnan(value) else f"{value:.3f}"

    lines = [
        f"Evaluated on {evaluation.n_images} images. Concept maps: mean over concept types of the (image, concept) "
        "pairs where the concept is present. Segmentation: class maps against the class object's mask.",
        "",
        "| method | " + " | ".join(HEADERS[c] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
        *("| " + " | ".join([m, *(cell(m, c) for c in columns)]) + " |" for m in methods),
    ]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    """Write atomically (temp file, then rename) so a crash never leaves half a metrics file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    _write_text(path, frame.to_csv(index=False, float_format="%.6g"))


def write_evaluation(evaluation: Evaluation, layout: Layout) -> None:
    """Write metrics/evaluate.json, the plot CSVs and metrics/summary.md."""
    _write_text(layout.evaluate_metrics, json.dumps(metrics_dict(evaluation), indent=2, allow_nan=False) + "\n")
    _write_csv(layout.iou_curves, evaluation.iou_curves)
    _write_csv(layout.accuracy_path, evaluation.accuracy_path)
    _write_text(layout.evaluate_summary, summary_table(evaluation))
