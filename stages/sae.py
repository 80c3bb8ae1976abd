"""sae: FaCT's bias-free TopK sparse autoencoder, trained on the sae_data vectors."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def sae(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/fact/sae.pt and the loss curve metrics/plots/fact_sae.csv.

    Checkpoints every fact.sae.checkpoint_every steps outside the DVC outputs; a killed run resumes.
    """
    from lib.methods.fact.sae_stage import run_sae

    run_sharded_stage("sae", params, run_sae)
