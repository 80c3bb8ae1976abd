"""`python -m stages <stage> [--params params.yaml]`: one Typer command per pipeline stage.

The commands come from one explicit table (`COMMANDS`), not from import side effects.
"""

from collections.abc import Callable

import typer

from stages import (
    cbl,
    circles,
    clip_images,
    concepts,
    evaluate,
    explain,
    features,
    prepare,
    similarity,
    sparse,
    toy_backbone,
    toy_clip,
    toy_report,
)

COMMANDS: dict[str, Callable[..., None]] = {
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
    "explain": explain.explain,
    "probe": explain.probe,
    "intervene": explain.intervene,
    "evaluate": evaluate.evaluate,
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
