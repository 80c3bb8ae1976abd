"""explain, probe, intervene: SALF-CBM explanations of test images or image files.

`explain` with no images is the DVC stage (seeded test images + a gallery into data/<name>/explain);
`probe` and `intervene` are interactive and print JSON to stdout.
"""

from pathlib import Path
from typing import Annotated

import typer

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage, stage_setup, summary, user_errors
from lib.core.errors import UserError

IndexOption = Annotated[list[int] | None, typer.Option("--index", "-i", help="Store row of an image (repeatable).")]
ImageOption = Annotated[list[Path] | None, typer.Option("--image", help="Image file (repeatable).")]
ClassOption = Annotated[int | None, typer.Option("--class", help="Class index to explain instead of the prediction.")]
BoxOption = Annotated[str | None, typer.Option("--box", help="ROI box x0,y0,x1,y1 in pixels (x1, y1 exclusive).")]
MaskOption = Annotated[Path | None, typer.Option("--mask", help="ROI mask image (nonzero = inside), image-sized.")]


def _setup(params: Path):
    """(config, layout, the trained model on runtime.device) of a command."""
    from lib.methods.salf.artifacts import SalfModel

    config, layout, device = stage_setup(params)
    return config, layout, SalfModel.load(layout, device)


def _one_image(params: Path, index: list[int] | None, image: list[Path] | None):
    """(config, model, concept maps (M, G, G)) of the single image a command works on."""
    from lib.methods.salf.images import load_inputs

    if len(index or []) + len(image or []) != 1:
        raise UserError("give exactly one image: --index ROW or --image FILE")
    config, layout, model = _setup(params)
    maps = load_inputs(model, config, layout, index or [], image or []).maps
    return config, model, maps[0]


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
    with user_errors():
        import json

        from lib.methods.salf.explain import probe as probe_roi
        from lib.methods.salf.images import parse_roi

        roi = parse_roi(box, mask)
        config, model, maps = _one_image(params, index, image)
        k = top_k if top_k is not None else min(config.explain.top_k, maps.shape[0])
        result = probe_roi(model.classifier, maps, roi, model.registration, k=k)
    typer.echo(json.dumps(result, indent=2))
    summary("probe", ", ".join(f"{c['name']} {c['score']:.2f}" for c in result["concepts"]))


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
    with user_errors():
        import json

        from lib.methods.salf.explain import intervene as edit
        from lib.methods.salf.images import parse_roi

        roi = parse_roi(box, mask)
        _, model, maps = _one_image(params, index, image)
        result = edit(model.classifier, maps, concept, roi, beta, model.registration, target=class_index)
    typer.echo(json.dumps(result, indent=2))
    old, new = result["old_class"], result["new_class"]
    summary(
        "intervene",
        f"{result['concept']} {beta:+g} on {result['cells']} cells ({result['cell_share']:.2f} cells' worth): {result['old_class_name']} "
        f"({result['old_logits'][old]:.2f}) -> {result['new_class_name']} ({result['new_logits'][new]:.2f}); "
        f"{result['target_class_name']} logit {result['target_logit_change']:+.3f}",
    )
