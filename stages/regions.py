"""regions: CE-FAM concept regions at every layer, association scores and contributions."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def regions(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/cefam/regions.zarr, cefam/concept_stats.zarr, explanation PNGs and metrics/cefam_regions.json."""
    from lib.methods.cefam.regions_stage import check_regions, run_regions

    run_sharded_stage("regions", params, run_regions, check=check_regions)
