"""similarity: P[n, m, h, w], the cosine of each red-circle embedding with each concept."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def similarity(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/similarity.zarr: P (N, M, G, G) fp16.

    With similarity.materialize false (or auto, when P would exceed similarity.max_stored_gb) it holds
    only P's provenance; later stages compute P on the fly.
    """
    from lib.pipeline.similarity import run_similarity

    run_sharded_stage("similarity", params, run_similarity)
