"""The evaluate stage's entry point: score every available method, write the metrics, report."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress

from lib.core.layout import Layout
from lib.core.params import Params
from lib.evaluate.report import summary_table, write_evaluation
from lib.evaluate.run import Evaluation, evaluate_all


@dataclass(frozen=True)
class EvaluateReport:
    evaluation: Evaluation
    layout: Layout

    def details(self) -> str:
        """The methods x metrics table (Markdown), printed above the summary line."""
        return summary_table(self.evaluation)

    def summary(self) -> str:
        evaluation = self.evaluation
        skipped = f"; skipped (disabled, or their stages have not run): {', '.join(evaluation.skipped)}" if evaluation.skipped else ""
        methods = sorted({*evaluation.concept_maps, *evaluation.segmentation})
        return f"{len(methods)} methods on {evaluation.n_images} images -> {self.layout.evaluate_metrics}{skipped}"


def run_evaluate(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> EvaluateReport:
    """Evaluate every method whose outputs exist; write metrics/evaluate.json, summary.md and plot data."""
    evaluation = evaluate_all(config, layout, device, progress)
    write_evaluation(evaluation, layout)
    return EvaluateReport(evaluation, layout)
