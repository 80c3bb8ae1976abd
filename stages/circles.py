"""circles: CLIP embeddings of every image with a red circle on each cell of a grid."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def circles(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/circles.zarr: circles (N, G, G, D) fp16 embeddings.

    Resumes an interrupted run; runs under torchrun too: each rank writes the shards it owns.
    """
    from lib.pipeline.circles import check_circles, run_circles

    run_sharded_stage("circles", params, run_circles, check=check_circles)
