"""clip_images: the CLIP embedding of every plain image."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption
from lib.core.sharded_stage import run_sharded_stage


def clip_images(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/clip_images.zarr: image_emb (N, D) fp16.

    Resumes an interrupted run; runs under torchrun too: each rank writes the shards it owns.
    """
    from lib.pipeline.clip_images import check_clip_images, run_clip_images

    run_sharded_stage("clip_images", params, run_clip_images, check=check_clip_images)
