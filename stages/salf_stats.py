"""salf-stats: SALF-CBM's per-image concept presence and contributions on the test split, for `stats`."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def salf_stats(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/salf/concept_stats.zarr (presence c*, contributions W[l,m]·c*[m], predictions)."""
    from lib.methods.salf.stats_stage import run_salf_stats

    run_stage("salf-stats", params, run_salf_stats)
