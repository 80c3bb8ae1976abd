"""The toy world's model architectures and where their shipped weights live."""

from pathlib import Path

MODELS_DIR = Path("models/toy")
BACKBONE_FILES = {"cnn": MODELS_DIR / "cnn.pt", "bcos": MODELS_DIR / "bcos.pt"}
CLIP_DIR = MODELS_DIR / "clip"
