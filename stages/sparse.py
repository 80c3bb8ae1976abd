"""sparse: the SALF-CBM final layer (elastic-net path over pooled, standardised concept activations)."""

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, progress, stage_setup, summary, user_errors


@app.command()
def sparse(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/salf/classifier.pt, salf/activations.zarr, metrics/salf.json and the lambda path."""
    with user_errors():
        from lib.salf.train import run_sparse

        config, layout, device = stage_setup(params)
        with progress() as bar:
            report = run_sparse(config, layout, device, bar)
    m = report.metrics
    recovery = "" if m["rule_recovery"] is None else f", rule recovery {m['rule_recovery']:.2f}"
    summary(
        "sparse",
        f"test accuracy sparse {m['acc_sparse']:.3f} ({m['nonzero_per_class']:.1f} weights/class, lambda "
        f"{report.selected_lambda:.2e}), dense {m['acc_dense']:.3f}, backbone {m['acc_backbone']:.3f}{recovery} "
        f"-> {layout.salf_metrics}",
    )
