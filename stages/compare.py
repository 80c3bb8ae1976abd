"""compare: every method side by side, its contributions against the true concept effects (toy world)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def compare(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write metrics/compare.json, metrics/compare.md and metrics/plots/compare_scatter.csv."""
    from lib.compare.stage import run_compare

    run_stage("compare", params, run_compare)
