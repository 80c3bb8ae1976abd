"""cbl: the SALF-CBM concept bottleneck (backbone features -> concept maps matching P)."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, progress, stage_setup, summary, user_errors


@app.command()
def cbl(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/salf/bottleneck.pt, salf/concepts.json (kept/dropped by val cos^3) and the loss curve."""
    with user_errors():
        from lib.salf.train import run_cbl

        config, layout, device = stage_setup(params)
        with progress() as bar:
            report = run_cbl(config, layout, device, bar)
    val = "val carved from train" if report.val_from_train else "manifest val split"
    dropped = f" (dropped: {', '.join(report.dropped)})" if report.dropped else ""
    summary(
        "cbl",
        f"{report.n_concepts - len(report.dropped)}/{report.n_concepts} concepts kept{dropped}; best val cos^3 "
        f"{-report.best_val_loss:.3f} at step {report.best_step}{' (early stop)' if report.stopped_early else ''}; "
        f"{report.n_train} train / {report.n_val} val images ({val})",
    )
