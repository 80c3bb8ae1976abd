"""Where each stage reads and writes, derived from params (dvc.yaml uses the same paths)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib.params import Params

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """Paths of one dataset's pipeline outputs under ``data/<name>/``."""

    root: Path

    @classmethod
    def from_params(cls, params: Params, base: Path = Path("data")) -> Layout:
        return cls(base / params.data.name)

    # prepare
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def images(self) -> Path:
        return self.root / "images.zarr"

    @property
    def masks(self) -> Path:
        """Ground-truth concept masks (toy world / segmentation data only)."""
        return self.root / "masks.zarr"

    @property
    def dataset_info(self) -> Path:
        """Class names, concept names/types and (toy world) class rules, as JSON."""
        return self.root / "dataset.json"

    @property
    def captions(self) -> Path:
        return self.root / "captions.parquet"

    @property
    def bad_images(self) -> Path:
        return self.root / "bad_images.txt"

    @property
    def preview(self) -> Path:
        return self.root / "preview.png"

    # extraction
    def features(self, layer: str) -> Path:
        return self.root / "features" / f"{layer}.zarr"

    @property
    def logits(self) -> Path:
        return self.root / "features" / "logits.zarr"

    @property
    def circles(self) -> Path:
        return self.root / "circles.zarr"

    @property
    def concepts(self) -> Path:
        return self.root / "concepts"

    @property
    def similarity(self) -> Path:
        return self.root / "similarity.zarr"

    # SALF-CBM
    @property
    def salf(self) -> Path:
        return self.root / "salf"

    @property
    def explain(self) -> Path:
        return self.root / "explain"
