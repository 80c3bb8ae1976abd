"""`python -m stages <stage> [--params params.yaml]`: one Typer command per pipeline stage.

The commands come from one explicit table (`COMMANDS`), not from import side effects.
"""

from collections.abc import Callable

import typer

from stages import (
    cbl,
    circles,
    clip_images,
    compare,
    concepts,
    contributions,
    counterfactuals,
    doctor,
    evaluate,
    explain,
    fact_explain,
    features,
    prepare,
    regions,
    sae,
    sae_data,
    salf_stats,
    similarity,
    sparse,
    stats,
    toy_backbone,
    toy_clip,
    toy_report,
    translator,
)

COMMANDS: dict[str, Callable[..., None]] = {
    "doctor": doctor.doctor,  # not a pipeline stage: every stage's checks at once, before `dvc repro`
    "prepare": prepare.prepare,
    "toy-backbone": toy_backbone.toy_backbone,
    "toy-clip": toy_clip.toy_clip,
    "toy-report": toy_report.toy_report,
    "features": features.features,
    "clip-images": clip_images.clip_images,
    "circles": circles.circles,
    "concepts": concepts.concepts,
    "similarity": similarity.similarity,
    "cbl": cbl.cbl,
    "sparse": sparse.sparse,
    "salf-stats": salf_stats.salf_stats,
    "explain": explain.explain,
    "probe": explain.probe,
    "intervene": explain.intervene,
    "translator": translator.translator,
    "regions": regions.regions,
    "sae-data": sae_data.sae_data,
    "sae": sae.sae,
    "contributions": contributions.contributions,
    "fact-explain": fact_explain.fact_explain,
    "counterfactuals": counterfactuals.counterfactuals,
    "evaluate": evaluate.evaluate,
    "stats": stats.stats,
    "compare": compare.compare,
}


def build_app() -> typer.Typer:
    """The Typer app with every command of COMMANDS."""
    app = typer.Typer(
        help="conceptrace pipeline stages. Each command reads params.yaml; `dvc repro` runs them in order.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for name, command in COMMANDS.items():
        app.command(name)(command)
    return app


app = build_app()

if __name__ == "__main__":
    app()
