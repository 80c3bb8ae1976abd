"""stats: every concept method's per-image presence and contributions reduced with dask."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def stats(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write metrics/stats.json and the tables under data/<name>/stats/ for every method whose store exists."""
    from lib.stats.stage import run_stats

    run_stage("stats", params, run_stats)
