"""evaluate: every available method's maps scored against the ground-truth masks."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def evaluate(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write metrics/evaluate.json, metrics/summary.md and the plot data under metrics/plots/."""
    from lib.evaluate.stage import check_evaluate, run_evaluate

    run_stage("evaluate", params, run_evaluate, check=check_evaluate)
