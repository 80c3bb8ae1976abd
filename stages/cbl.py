"""cbl: the SALF-CBM concept bottleneck (backbone features -> concept maps matching P)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def cbl(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/salf/bottleneck.pt, salf/concepts.json (kept/dropped by val cos^3) and the loss curve."""
    from lib.methods.salf.bottleneck_stage import run_cbl

    run_sharded_stage("cbl", params, run_cbl)
