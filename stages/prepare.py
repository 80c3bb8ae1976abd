"""prepare: the manifest, image store, ground-truth masks (toy world, segfolder) and a preview PNG."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, progress, summary, user_errors


@app.command()
def prepare(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Build data/<name>/: manifest.parquet, images.zarr (images, labels, masks where known), dataset.json, preview.png."""
    with user_errors():
        from lib.data.prepare import prepare_imagefolder, prepare_segfolder, prepare_toy
        from lib.layout import Layout
        from lib.params import load_params

        config = load_params(params)
        layout = Layout.from_params(config)
        layout.root.mkdir(parents=True, exist_ok=True)
        with progress() as bar:
            if config.data.kind == "toy":
                report = prepare_toy(config.data, layout, bar)
            elif config.data.kind == "imagefolder":
                report = prepare_imagefolder(config.data, config.runtime, layout, bar)
            else:
                report = prepare_segfolder(config.data, config.runtime, layout, bar)
    counts = ", ".join(f"{k} {v}" for k, v in report.split_counts.items())
    bad = f"; {len(report.bad_images)} bad images skipped (see {layout.bad_images})" if report.bad_images else ""
    summary("prepare", f"{report.n_images} images ({counts}) in {layout.root}{bad}")
