"""sparse: the SALF-CBM final layer (elastic-net path over pooled, standardised concept activations)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def sparse(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/salf/classifier.pt, salf/activations.zarr, metrics/salf.json and the lambda path."""
    from lib.methods.salf.sparse_stage import run_sparse

    run_stage("sparse", params, run_sparse)
