"""Writing the evaluation: metrics JSON (dvc metrics), plot CSVs (dvc plots) and a Markdown table."""

from __future__ import annotations

import math
from typing import Any

from lib.core.layout import Layout
from lib.core.outputs import json_safe, write_csv, write_json, write_text
from lib.evaluate.run import Evaluation
from lib.evaluate.scoring import SEGMENTATION_KEYS
from lib.metrics.spatial import AVERAGE_KEY

CONCEPT_KEYS = ("nra", "epg", "hit")
HEADERS = {"nra": "NRA", "epg": "EPG", "hit": "Hit rate", "pixel_acc": "pixel acc", "miou": "mIoU", "map": "mAP"}


def metrics_dict(evaluation: Evaluation) -> dict[str, Any]:
    """{"concept_maps": {METHOD: {"avg": {...}, TYPE: {...}}}, "segmentation": {METHOD: {...}}}."""
    return json_safe({"concept_maps": evaluation.concept_maps, "segmentation": evaluation.segmentation}, digits=6)


def summary_table(evaluation: Evaluation) -> str:
    """Markdown table, one row per method: the concept-map averages and the segmentation scores."""
    methods = list(dict.fromkeys([*evaluation.concept_maps, *evaluation.segmentation]))
    columns = [*CONCEPT_KEYS, *SEGMENTATION_KEYS]

    def cell(method: str, key: str) -> str:
        group = (
            evaluation.concept_maps.get(method, {}).get(AVERAGE_KEY, {}) if key in CONCEPT_KEYS else evaluation.segmentation.get(method, {})
        )
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


def write_evaluation(evaluation: Evaluation, layout: Layout) -> None:
    """Write metrics/evaluate.json, the plot CSVs and metrics/summary.md."""
    write_json(layout.evaluate_metrics, metrics_dict(evaluation))
    write_csv(layout.iou_curves, evaluation.iou_curves)
    write_csv(layout.accuracy_path, evaluation.accuracy_path)
    write_text(layout.evaluate_summary, summary_table(evaluation))
