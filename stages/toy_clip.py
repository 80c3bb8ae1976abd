"""toy_clip: the toy world's teacher CLIP (trained once, shipped in git)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def toy_clip(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Train the toy teacher CLIP on toy captions and red-circle captions: models/toy/clip/."""
    from lib.toy.train_clip import run_toy_clip

    run_stage("toy-clip", params, run_toy_clip)
