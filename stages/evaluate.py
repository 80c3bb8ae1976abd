"""evaluate: every available method's maps scored against the ground-truth masks."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, console, progress, stage_setup, summary, user_errors


@app.command()
def evaluate(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write metrics/evaluate.json, metrics/summary.md and the plot data under metrics/plots/."""
    with user_errors():
        from rich.markdown import Markdown

        from lib.evaluate.report import summary_table, write_evaluation
        from lib.evaluate.run import run_evaluate

        config, layout, device = stage_setup(params)
        with progress() as bar:
            evaluation = run_evaluate(config, layout, device, bar)
        write_evaluation(evaluation, layout)
    console.print(Markdown(summary_table(evaluation)))
    skipped = f"; skipped (disabled, or their stages have not run): {', '.join(evaluation.skipped)}" if evaluation.skipped else ""
    methods = sorted({*evaluation.concept_maps, *evaluation.segmentation})
    summary("evaluate", f"{len(methods)} methods on {evaluation.n_images} images -> {layout.evaluate_metrics}{skipped}")
