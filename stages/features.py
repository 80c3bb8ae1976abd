"""features: the backbone's feature maps of the configured layers, and its logits."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def features(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/features/<layer>.zarr (N, C, H, W) fp16 and features/logits.zarr (N, K).

    Resumes an interrupted run; runs under torchrun too: each rank writes the shards it owns.
    """
    from lib.pipeline.features import check_features, run_features

    run_sharded_stage("features", params, run_features, check=check_features)
