"""translator: CE-FAM's translator h (pooled multi-layer features -> the CLIP image embedding)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def translator(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/cefam/translator.pt, cefam/pooled.zarr, metrics/cefam.json and the loss curve."""
    from lib.methods.cefam.translator_stage import check_translator, run_translator

    run_stage("translator", params, run_translator, sharded=True, check=check_translator)
