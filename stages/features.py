"""features: the backbone's feature maps of the configured layers, and its logits."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, progress, sharded_stage, summary, user_errors


@app.command()
def features(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/features/<layer>.zarr (N, C, H, W) fp16 and features/logits.zarr (N, K).

    Runs under torchrun too: each rank writes the shards it owns.
    """
    with user_errors():
        from lib.features import extract_features

        config, layout, device, ranks = sharded_stage(params)
        with progress() as bar:
            report = extract_features(config, layout, device, ranks, bar)
    shapes = ", ".join(f"{k} {v}" for k, v in report.shapes.items())
    removed = f"; removed the stores of layers no longer configured: {', '.join(report.removed)}" if report.removed else ""
    summary("features", f"{report.n_images} images, {report.shards_written} shards written; {shapes}{removed}")
