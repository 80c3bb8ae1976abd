"""The toy teacher CLIP's architecture: an open_clip config registered under TOY_CLIP_NAME.

Training lives in lib.toy.train_clip; this module is what loading and saving need.
"""

from pathlib import Path

import open_clip
import torch
from torch import nn

from lib.kernels.preprocess import Preprocess
from lib.models.clip_format import preprocess_from_open_clip, save_clip_dir

TOY_CLIP_NAME = "toy-clip"
CONFIG_DIR = Path(__file__).parent / "configs"


def register_toy_clip_config() -> None:
    """Make TOY_CLIP_NAME known to open_clip (idempotent): its config lives in CONFIG_DIR."""
    if TOY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def create_toy_clip(seed: int) -> nn.Module:
    """A randomly initialised toy CLIP (fp32, CPU), deterministic in `seed`."""
    register_toy_clip_config()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.create_model(TOY_CLIP_NAME)


def toy_clip_preprocess(model: nn.Module) -> Preprocess:
    """The Preprocess open_clip attached to `model` (what a reloaded checkpoint reports)."""
    return preprocess_from_open_clip(model.visual.preprocess_cfg)


def save_open_clip_checkpoint(model: nn.Module, folder: str | Path, half: bool = True) -> Path:
    """Write `model` as an open_clip folder (open_clip_config.json + weights); returns the folder.

    It loads with load_clip(TOY_CLIP_NAME, "local-dir:<folder>"), or, after
    register_toy_clip_config(), with load_clip(TOY_CLIP_NAME, "<folder>/<weights file>"); the
    config records the model config and preprocessing. half=True stores fp16 weights.
    """
    register_toy_clip_config()
    config = open_clip.get_model_config(TOY_CLIP_NAME)
    return save_clip_dir(folder, model, config, toy_clip_preprocess(model), half=half)
