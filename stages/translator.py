"""translator: CE-FAM's translator h (pooled multi-layer features -> the CLIP image embedding)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def translator(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/cefam/translator.pt, cefam/pooled.zarr, metrics/cefam.json and the loss curve."""
    from lib.methods.cefam.translator_stage import check_translator, run_translator

    run_sharded_stage("translator", params, run_translator, check=check_translator)
