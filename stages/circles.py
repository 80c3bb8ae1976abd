"""circles: CLIP embeddings of every image with a red circle on each cell of a grid, and of the plain image."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, progress, sharded_stage, summary, user_errors


@app.command()
def circles(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/circles.zarr: circles (N, G, G, D) and global (N, D) fp16 embeddings.

    Resumes an interrupted run; runs under torchrun too: each rank writes the shards it owns.
    """
    with user_errors():
        from lib.circle_store import extract_circles

        config, layout, device, ranks = sharded_stage(params)
        with progress() as bar:
            report = extract_circles(config, layout, device, ranks, bar)
    summary(
        "circles",
        f"{report.n_images} images x {report.grid}x{report.grid} circles, D={report.embed_dim}, "
        f"{report.shards_written} shards written ({report.model_id})",
    )
