"""fact-explain: FaCT's figures (per image the logit's map, its top concepts, the other concepts; B-cos colour maps),
a gallery and local-and-global figures."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def fact_explain(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Write data/<name>/fact/explain/: row<index>.png per explained test image, gallery.png, local_row<index>_latent<j>.png,
    explanations.json."""
    from lib.methods.fact.backbone import check_fact
    from lib.methods.fact.explain import run_fact_explain

    run_stage("fact-explain", params, run_fact_explain, check=check_fact)
