"""similarity: P[n, m, h, w], the cosine of each red-circle embedding with each concept."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, progress, sharded_stage, summary, user_errors


@app.command()
def similarity(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/similarity.zarr: P (N, M, G, G) fp16.

    With similarity.materialize false it holds only P's provenance; later stages compute P on the fly.
    """
    with user_errors():
        from lib.similarity_store import build_similarity

        config, layout, device, ranks = sharded_stage(params)
        with progress() as bar:
            report = build_similarity(config, layout, device, ranks, bar)
    stored = f"{report.shards_written} shards written" if report.materialized else "not materialised (computed on the fly)"
    summary("similarity", f"P {report.shape}: {stored}")
