"""prepare: the manifest, image store, ground-truth masks (toy world, segfolder) and a preview PNG."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def prepare(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Build data/<name>/: manifest.parquet, images.zarr (images, labels, masks where known), dataset.json, preview.png."""
    from lib.data.prepare import check_prepare, run_prepare

    run_stage("prepare", params, run_prepare, check=check_prepare)
