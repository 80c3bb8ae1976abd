"""toy_backbone, toy_clip, toy_report: the toy world's own models (trained once, shipped in git)."""

from pathlib import Path

from lib.cli import DEFAULT_PARAMS_PATH, ParamsOption, app, console, summary, user_errors


@app.command("toy-backbone")
def toy_backbone(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Train the toy CNN and B-cos CNN: models/toy/{cnn,bcos}.pt and their learning curves."""
    with user_errors():
        from lib.device import resolve_device
        from lib.outputs import write_csv
        from lib.params import load_params
        from lib.toy_models import train_toy_backbones

        config = load_params(params)
        history = train_toy_backbones(config, resolve_device(config.runtime.device), lambda arch, r: console.print(arch, r, highlight=False))
        write_csv(Path("metrics/plots/toy_backbone.csv"), history)
    last = history.groupby("arch").last()["val_acc"]
    summary("toy-backbone", "val accuracy " + ", ".join(f"{arch} {acc:.3f}" for arch, acc in last.items()))


@app.command("toy-clip")
def toy_clip(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Train the toy teacher CLIP on toy captions and red-circle captions: models/toy/clip/."""
    with user_errors():
        from lib.device import resolve_device
        from lib.outputs import write_csv
        from lib.params import load_params
        from lib.toy_models import train_teacher_clip

        config = load_params(params)
        curve = train_teacher_clip(config, resolve_device(config.runtime.device), lambda r: console.print(r, highlight=False))
        write_csv(Path("metrics/plots/toy_clip.csv"), curve)
    summary("toy-clip", f"{len(curve)} steps, final loss {curve['loss'].iloc[-1]:.3f}")


@app.command("toy-report")
def toy_report(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Score the shipped toy models on the toy test split: metrics/toy_models.json."""
    with user_errors():
        from lib.device import resolve_device
        from lib.outputs import write_json
        from lib.params import load_params
        from lib.toy_models import evaluate_toy_models

        config = load_params(params)
        metrics = evaluate_toy_models(config, resolve_device(config.runtime.device))
        write_json(Path("metrics/toy_models.json"), metrics)
    local = ", ".join(f"{k} {v:.2f}" for k, v in metrics["clip_local_acc"].items())
    summary("toy-report", f"backbone {metrics['backbone_acc']:.3f}, bcos {metrics['bcos_acc']:.3f}, CLIP local {local}, global {metrics['clip_global_acc']:.2f}")
