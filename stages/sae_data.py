"""sae-data: FaCT's SAE training vectors, sampled from the stored feature maps of fact.layer."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def sae_data(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/fact/sae_data.zarr: per train image min(fact.positions_budget // C, H*W) positions, fp16.

    Positions are drawn by |sum_c grad * act| of the predicted logit (seeded); resumes an interrupted run.
    """
    from lib.methods.fact.backbone import check_fact
    from lib.methods.fact.vectors import run_sae_data

    run_sharded_stage("sae-data", params, run_sae_data, check=check_fact)
