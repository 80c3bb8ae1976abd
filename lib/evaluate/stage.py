"""The evaluate stage's entry point: score every available method, write the metrics, report."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress

from lib.core.layout import Layout
from lib.core.params import Params
from lib.evaluate.report import summary_table, write_evaluation
from lib.evaluate.run import Evaluation, evaluate_all
from lib.models.backbones import check_backbone
from lib.models.layers import check_layers


@dataclass(frozen=True)
class EvaluateReport:
    evaluation: Evaluation
    layout: Layout

    def details(self) -> str:
        """The methods x metrics table (Markdown), printed above the summary line ("" when nothing was scored)."""
        return "" if self.evaluation.unscored else summary_table(self.evaluation)

    def summary(self) -> str:
        evaluation = self.evaluation
        if evaluation.unscored:
            paths = sorted(set(evaluation.accuracy_path["method"]))
            kept = f"; accuracy paths of {', '.join(paths)} -> {self.layout.accuracy_path}" if paths else ""
            return f"concept maps and segmentation skipped: {evaluation.unscored}{kept}"
        skipped = f"; skipped (disabled, or their stages have not run): {', '.join(evaluation.skipped)}" if evaluation.skipped else ""
        methods = sorted({*evaluation.concept_maps, *evaluation.segmentation})
        return f"{len(methods)} methods on {evaluation.n_images} images -> {self.layout.evaluate_metrics}{skipped}"


def check_evaluate(config: Params) -> None:
    """The stage's checks before any work: with CAM baselines, the backbone's arch and their layer
    (no weights read; a weights file that does not exist yet only leaves the CAMs out)."""
    if config.evaluate.cam_methods:
        skeleton = check_backbone(config.backbone, weights=False)
        key = "evaluate.cam_layer" if config.evaluate.cam_layer else "features.layers"
        check_layers(skeleton, [config.evaluate.cam_layer or config.features.layers[-1]], key)


def run_evaluate(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> EvaluateReport:
    """Evaluate every method whose outputs exist; write metrics/evaluate.json, summary.md and plot data."""
    evaluation = evaluate_all(config, layout, device, progress)
    write_evaluation(evaluation, layout)
    return EvaluateReport(evaluation, layout)
