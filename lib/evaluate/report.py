"""Writing the evaluation: metrics JSON (dvc metrics), plot CSVs (dvc plots) and a Markdown table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from lib.core.layout import Layout
from lib.core.outputs import json_safe, write_csv, write_json, write_text
from lib.core.skipped import skipped
from lib.evaluate.run import Evaluation
from lib.evaluate.scoring import CONCEPT_KEYS, SEGMENTATION_KEYS
from lib.metrics.spatial import AVERAGE_KEY

TABLE_KEYS = (*CONCEPT_KEYS, "nra_authors", "epg_authors", "hit_authors")  # a protocol left out shows "–"

HEADERS = {
    "nra": "NRA", "nra_chance": "NRA (chance)", "epg": "EPG", "hit": "Hit rate", "coverage": "coverage",
    "nra_authors": "NRA (authors)", "epg_authors": "EPG (authors)", "hit_authors": "Hit (authors)",
    "pixel_acc": "pixel acc", "miou": "mIoU", "map": "mAP",
}
NOTE = (
    "Concept maps, over every ground-truth (image, concept) pair, averaged per concept type, then over types: "
    "NRA as CE-FAM defines it (lower curve a·n: random maps score about 0.1-0.3), NRA (chance) with the chance "
    "curve as the lower reference (random = 0), EPG on maps min-max rescaled, Hit rate = NRA > threshold with a "
    "concept the method has no map for counted as a miss, coverage = share of pairs the method has a map for; "
    "(authors): the same by the authors' evaluate.py (their integration and tie order, EPG 0 where the chosen NRA is 0). "
    "Segmentation: class maps against the class object's mask."
)


def metrics_dict(evaluation: Evaluation) -> dict[str, Any]:
    """{"concept_maps": {METHOD: {"avg": {...}, TYPE: {...}}}, "segmentation": {METHOD: {...}}};
    {"skipped": reason} when no map was scored (data without masks)."""
    if evaluation.unscored is not None:
        return skipped(evaluation.unscored)
    return json_safe({"concept_maps": evaluation.concept_maps, "segmentation": evaluation.segmentation}, digits=6)


def number(value: float | None, spec: str = ".3f") -> str:
    """A table cell: `value` in format `spec`, "–" when it is missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = format(value, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # a chance-level NRA of -1e-17 is 0


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], text_columns: int = 1) -> list[str]:
    """The lines of a Markdown table: the first `text_columns` columns left-aligned, the others (numbers) right-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def summary_table(evaluation: Evaluation) -> str:
    """Markdown: one row per method (concept-map averages, segmentation), then the concept-map
    metrics of every concept method per concept type; the reason alone when no map was scored."""
    if evaluation.unscored is not None:
        return f"Concept maps and segmentation skipped: {evaluation.unscored}.\n"
    methods = list(dict.fromkeys([*evaluation.concept_maps, *evaluation.segmentation]))
    columns = [*TABLE_KEYS, *SEGMENTATION_KEYS]

    def cell(method: str, key: str) -> str:
        group = (
            evaluation.concept_maps.get(method, {}).get(AVERAGE_KEY, {}) if key in TABLE_KEYS else evaluation.segmentation.get(method, {})
        )
        return number(group.get(key))

    lines = [
        f"Evaluated on {evaluation.n_images} images. {NOTE}",
        "",
        *markdown_table(["method", *(HEADERS[c] for c in columns)], ([m, *(cell(m, c) for c in columns)] for m in methods)),
    ]
    if evaluation.concept_maps:
        lines += [
            "",
            *markdown_table(
                ["method", "concept type", *(HEADERS[c] for c in TABLE_KEYS)],
                (
                    [m, kind, *(number(values.get(c)) for c in TABLE_KEYS)]
                    for m, groups in evaluation.concept_maps.items()
                    for kind, values in groups.items()
                    if kind != AVERAGE_KEY
                ),
                text_columns=2,
            ),
        ]
    return "\n".join(lines) + "\n"


def write_evaluation(evaluation: Evaluation, layout: Layout) -> None:
    """Write metrics/evaluate.json, the plot CSVs and metrics/summary.md."""
    write_json(layout.evaluate_metrics, metrics_dict(evaluation))
    write_csv(layout.iou_curves, evaluation.iou_curves)
    write_csv(layout.accuracy_path, evaluation.accuracy_path)
    write_text(layout.evaluate_summary, summary_table(evaluation))
