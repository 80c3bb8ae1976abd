"""explain, probe, intervene: SALF-CBM explanations of test images or image files.

`explain` with no images is the DVC stage (seeded test images + a gallery into data/<name>/explain);
`probe` and `intervene` are interactive and print JSON to stdout.
"""

import json
from pathlib import Path
from typing import Annotated

import typer

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage

IndexOption = Annotated[list[int] | None, typer.Option("--index", "-i", help="Store row of an image (repeatable).")]
ImageOption = Annotated[list[Path] | None, typer.Option("--image", help="Image file (repeatable).")]
ClassOption = Annotated[int | None, typer.Option("--class", help="Class index to explain instead of the prediction.")]
BoxOption = Annotated[str | None, typer.Option("--box", help="ROI box x0,y0,x1,y1 in pixels (x1, y1 exclusive).")]
MaskOption = Annotated[Path | None, typer.Option("--mask", help="ROI mask image (nonzero = inside), image-sized.")]


def explain(
    params: ParamsOption = DEFAULT_PARAMS_PATH,
    index: IndexOption = None,
    image: ImageOption = None,
    class_index: ClassOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: data/<name>/explain; explain_adhoc with --index/--image).")
    ] = None,
) -> None:
    """Prediction, top-k concept contributions and their heatmaps: <image>.png + <image>.json each.

    Without --index/--image: explain.n_images seeded test images and gallery.png (top-activating
    test images of random concepts) into data/<name>/explain (the DVC stage).
    """
    from lib.methods.salf.render import run_explain

    run_stage("explain", params, run_explain, indices=index or [], paths=image or [], class_index=class_index, out_dir=out)


def probe(
    params: ParamsOption = DEFAULT_PARAMS_PATH,
    index: IndexOption = None,
    image: ImageOption = None,
    box: BoxOption = None,
    mask: MaskOption = None,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="Concepts to list (default explain.top_k).")] = None,
) -> None:
    """Explain anything: the top-k concepts inside a region of one image (JSON on stdout)."""
    from lib.methods.salf.interact import run_probe

    report = run_stage("probe", params, run_probe, rows=index or [], files=image or [], box=box, mask=mask, top_k=top_k)
    typer.echo(json.dumps(report.result, indent=2))


def intervene(
    concept: Annotated[str, typer.Option("--concept", "-c", help="Concept name to edit.")],
    beta: Annotated[float, typer.Option("--beta", help="Added to the concept map inside the ROI (may be negative).")],
    params: ParamsOption = DEFAULT_PARAMS_PATH,
    index: IndexOption = None,
    image: ImageOption = None,
    box: BoxOption = None,
    mask: MaskOption = None,
    class_index: Annotated[
        int | None, typer.Option("--class", help="Class whose logit change is reported (default: the prediction).")
    ] = None,
) -> None:
    """Local intervention: add beta to one concept's map inside an ROI, re-pool and re-classify (JSON on stdout)."""
    from lib.methods.salf.interact import run_intervene

    report = run_stage(
        "intervene", params, run_intervene,
        concept=concept, beta=beta, rows=index or [], files=image or [], box=box, mask=mask, class_index=class_index,
    )  # fmt: skip
    typer.echo(json.dumps(report.result, indent=2))
