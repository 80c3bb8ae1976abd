"""toy_backbone: the toy world's CNN and B-cos CNN (trained once, shipped in git)."""

from lib.core.cli import DEFAULT_PARAMS_PATH, ParamsOption, run_stage


def toy_backbone(params: ParamsOption = DEFAULT_PARAMS_PATH) -> None:
    """Train the toy CNN and B-cos CNN: models/toy/{cnn,bcos}.pt and their learning curves."""
    from lib.toy.train_backbones import run_toy_backbone

    run_stage("toy-backbone", params, run_toy_backbone)
