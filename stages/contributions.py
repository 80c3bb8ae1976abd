"""contributions: FaCT's concepts spliced into the backbone on the test split (statistics, metrics, C²)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def contributions(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/fact/concept_stats.zarr, fact/matching.json and metrics/fact.json."""
    from lib.methods.fact.contributions_stage import check_contributions, run_contributions

    run_sharded_stage("contributions", params, run_contributions, check=check_contributions)
