"""similarity: P[n, m, h, w], the cosine of each red-circle embedding with each concept."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, progress, summary, user_errors


@app.command()
def similarity(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/similarity.zarr: P (N, M, G, G) fp16.

    With similarity.materialize false it holds only P's provenance; later stages compute P on the fly.
    """
    with user_errors():
        from lib.device import resolve_device
        from lib.distributed import init_ranks
        from lib.layout import Layout
        from lib.params import load_params
        from lib.similarity_store import build_similarity

        config = load_params(params)
        device = resolve_device(config.runtime.device)
        ranks, device = init_ranks(device)
        with progress() as bar:
            report = build_similarity(config, Layout.from_params(config), device, ranks, bar)
    stored = f"{report.shards_written} shards written" if report.materialized else "not materialised (computed on the fly)"
    summary("similarity", f"P {report.shape}: {stored}")
