"""doctor: every stage's checks at once (params, files, weights, device) and one line per stage saying what it will do."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption


def checks() -> dict:
    """dvc.yaml stage -> the check its command runs before any work (None: it has none). One table,
    the same functions the commands pass to run_stage; tests/test_doctor.py holds it to dvc.yaml."""
    from lib.data.prepare import check_prepare
    from lib.evaluate.stage import check_evaluate
    from lib.methods.cefam.regions_stage import check_regions
    from lib.methods.cefam.translator_stage import check_translator
    from lib.methods.fact.backbone import check_fact
    from lib.methods.fact.contributions_stage import check_contributions
    from lib.pipeline.circles import check_circles
    from lib.pipeline.clip_images import check_clip_images
    from lib.pipeline.concepts import check_concepts
    from lib.pipeline.features import check_features

    return {
        "prepare": check_prepare, "toy_backbone": None, "toy_clip": None, "toy_report": None, "features": check_features,
        "clip_images": check_clip_images, "circles": check_circles, "concepts": check_concepts, "similarity": None,
        "cbl": None, "sparse": None, "salf_stats": None, "explain": None, "translator": check_translator,
        "regions": check_regions, "sae_data": check_fact, "sae": None, "contributions": check_contributions,
        "fact_explain": check_fact, "counterfactuals": None, "evaluate": check_evaluate, "stats": None,
        "compare": None,
    }  # fmt: skip


def doctor(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Check every stage before any work and print what each will do; every problem one line (exit 2 if any)."""
    import typer

    from lib.core.upstream import read_stages
    from lib.pipeline.doctor import run_doctor

    raise typer.Exit(run_doctor(params, list(read_stages()), checks()))
