"""The one validated schema of params.yaml: a pydantic model per stage section.

Every stage validates the whole file through :func:`load_params` before any work, so a bad value
fails at once with one message naming the file, the key, the value and what is allowed. Unknown keys are errors:
a typo must never be silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lib.core.errors import UserError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
DEFAULT_PARAMS = Path("params.yaml")
# autocast: "auto" (low precision only where the hardware has it natively), true (always), false (fp32)
Autocast = Literal["auto"] | bool


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamsError(UserError):
    """A params file that does not validate; the message lists every offending key."""


# --------------------------------------------------------------------------------------------
# data
class ToyWorldParams(Section):
    n_train: PositiveInt = 3000
    n_val: PositiveInt = 600
    n_test: PositiveInt = 600
    max_objects: Annotated[int, Field(ge=1, le=3)] = 3


class ImageFolderParams(Section):
    """A directory tree root/<class>/<image>, or a CSV/parquet list of (path, label[, split])."""

    root: str | None = None
    list_file: str | None = None
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1
    on_bad_image: Literal["error", "skip"] = "error"
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    @model_validator(mode="after")
    def _one_source(self) -> ImageFolderParams:
        if (self.root is None) == (self.list_file is None):
            raise ValueError("set exactly one of root (a class-per-folder tree) or list_file (CSV/parquet)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1 so some images remain for train")
        return self


class SegFolderParams(Section):
    """Image + mask pairs: root/images/<class>/<stem>.<ext> and root/masks/<class>/<stem>.png
    (optional root/concepts.csv: value,name,type of index-coded masks; see lib/data/segfolder.py)."""

    root: str
    test_fraction: Fraction = 1.0
    on_bad_image: Literal["error", "skip"] = "error"
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataParams(Section):
    kind: Literal["toy", "imagefolder", "segfolder"] = "toy"
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "toy"
    seed: int = 0
    image_size: Annotated[int, Field(ge=16, le=1024)] = 64
    rows_per_shard: PositiveInt = 256
    toy: ToyWorldParams = ToyWorldParams()
    imagefolder: ImageFolderParams | None = None
    segfolder: SegFolderParams | None = None

    @model_validator(mode="after")
    def _source_for_kind(self) -> DataParams:
        if self.kind == "imagefolder" and self.imagefolder is None:
            raise ValueError("kind 'imagefolder' needs an 'imagefolder' section (root or list_file)")
        if self.kind == "segfolder" and self.segfolder is None:
            raise ValueError("kind 'segfolder' needs a 'segfolder' section (root)")
        return self


# --------------------------------------------------------------------------------------------
# models
class RuntimeParams(Section):
    device: str = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 0

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto" and value.split(":")[0] not in {"cpu", "cuda", "mps"}:
            raise ValueError("must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'")
        return value


class BackboneParams(Section):
    """The model to explain: "torchvision:<name>", "timm:<name>", "bcos:<name>" or "toy:cnn|bcos"."""

    arch: str = "toy:cnn"
    weights: str | None = "models/toy/cnn.pt"  # local file, a named tag (needs network), or null


class ClipParams(Section):
    model: str = "toy-clip"
    pretrained: str | None = "local-dir:models/toy/clip"


class ToyClassifierParams(Section):
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    augment: bool = True
    loss: Literal["ce", "bce"] = "ce"  # B-cos models train with binary cross-entropy


class ToyBackboneParams(Section):
    """Toy backbones are trained on their own draw of the toy world (seeded), not on data/<name>."""

    seed: int = 1
    n_train: PositiveInt = 8000
    n_val: PositiveInt = 1000
    cnn: ToyClassifierParams = ToyClassifierParams()
    bcos: ToyClassifierParams = ToyClassifierParams(weight_decay=0.0, loss="bce")


class ToyClipParams(Section):
    """The toy teacher CLIP; its ring geometry is its own, so circles params can change freely."""

    data_seed: int = 1  # train draw: generate(n_train, data_seed); val draw: data_seed + 1
    seed: int = 0  # initialisation and batch sampling
    n_train: PositiveInt = 20000
    n_val: PositiveInt = 100
    steps: PositiveInt = 8000
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-3
    warmup: Annotated[int, Field(ge=0)] = 100
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    ring_radius: PositiveFloat = 10.0
    ring_width: PositiveFloat = 1.0
    grid: PositiveInt = 7
    ring_fraction: Fraction = 0.8
    object_fraction: Fraction = 0.8
    n_swaps: Annotated[int, Field(ge=0)] = 6
    eval_every: PositiveInt = 1000


# --------------------------------------------------------------------------------------------
# extraction
class FeaturesParams(Section):
    layers: Annotated[tuple[str, ...], Field(min_length=1)] = ("layer3",)
    batch_size: PositiveInt = 128


class CirclesParams(Section):
    """Red-circle prompts (lib/kernels/rings.py): a grid x grid layout of rings, sizes in CLIP input pixels."""

    grid: PositiveInt = 7
    radius: PositiveFloat = 32.0  # SALF-CBM at 224 px; the toy params use 10 at 64 px
    width: PositiveFloat = 2.0
    color: tuple[int, int, int] = (255, 0, 0)
    batch_size: PositiveInt = 32  # images read from the store per step
    chunk: PositiveInt = 512  # most CLIP inputs per forward; each image brings grid^2 of them
    autocast: Autocast = "auto"  # lib/core/device.py: auto = bf16/fp16 only where the hardware runs it natively

    @field_validator("color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in value):
            raise ValueError("must be three integers in 0..255 (R, G, B)")
        return value


class ConceptsParams(Section):
    """Concept list, prompt template per concept type, and LF-CBM's filters (lib/pipeline/concept_list.py)."""

    file: str = "concepts/toy.txt"
    default_template: str = "{}"
    templates: dict[str, str] = Field(default_factory=dict)
    max_chars: PositiveInt = 30
    duplicate_threshold: Fraction = 0.95
    class_similarity_threshold: Fraction = 1.0
    min_top5_similarity: Annotated[float, Field(ge=-1, le=1)] = -1.0

    @field_validator("default_template")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("must contain exactly one '{}' where the concept goes")
        return value

    @field_validator("templates")
    @classmethod
    def _each_has_slot(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {kind: template for kind, template in value.items() if template.count("{}") != 1}
        if bad:
            raise ValueError(f"templates {bad} must each contain exactly one '{{}}' where the concept goes")
        return value


class ClipImagesParams(Section):
    """Plain-image CLIP embeddings (lib/pipeline/clip_images.py)."""

    batch_size: PositiveInt = 128
    autocast: Autocast = "auto"


class SimilarityParams(Section):
    """P = cos(red-circle embeddings, text embeddings); materialize false leaves it to later stages."""

    materialize: bool = True
    batch_size: PositiveInt = 256


# --------------------------------------------------------------------------------------------
# SALF-CBM
class CblParams(Section):
    """SALF-CBM concept bottleneck (lib/methods/salf/cbl.py, bottleneck_stage.py); early stopping and the cos^3 filter use the val split."""

    layer: str | None = None  # backbone layer (one of features.layers); None = the last of them
    seed: int = 0
    lr: PositiveFloat = 1e-3
    batch_size: PositiveInt = 512
    max_steps: PositiveInt = 1000
    eval_every: PositiveInt = 20
    patience: PositiveInt = 10
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # only when the manifest has no val split
    cos3_threshold: Annotated[float, Field(ge=-1, le=1)] = 0.45
    # a split's features (resized to the grid) and P up to this size are held on the device; larger ones stream
    in_memory_mb: Annotated[float, Field(ge=0)] = 1024.0


class SparseParams(Section):
    pooling: Literal["avg", "max", "softmax"] = "avg"
    alpha: Annotated[float, Field(gt=0, le=1)] = 0.99
    n_lambdas: PositiveInt = 40
    lambda_min_ratio: Annotated[float, Field(gt=0, lt=1)] = 1e-3
    target_nonzeros_per_class: PositiveFloat = 5.0
    max_epochs: PositiveInt = 1000
    tol: PositiveFloat = 1e-5
    batch_size: PositiveInt = 256  # SAGA minibatch; >= 1024 left toy-sized paths unconverged after 200 epochs
    seed: int = 0
    dense_lambda: Annotated[float, Field(ge=0)] = 1e-4  # L2 strength of the dense comparison layer
    # c* of a split up to this size is held on the device; a larger one streams from its store every epoch
    in_memory_mb: Annotated[float, Field(ge=0)] = 1024.0


class ExplainParams(Section):
    n_images: PositiveInt = 8
    top_k: PositiveInt = 5
    gallery_concepts: PositiveInt = 6
    gallery_images: PositiveInt = 6
    seed: int = 0


class EvaluateParams(Section):
    """Scores every registered method's maps against ground-truth masks (lib/evaluate)."""

    split: Literal["train", "val", "test"] = "test"
    max_images: PositiveInt | None = None  # first N images of the split; None = all
    cam_methods: tuple[Literal["gradcam", "gradcam++", "scorecam"], ...] = ("gradcam", "gradcam++", "scorecam")
    cam_layer: str | None = None  # None = the last of features.layers
    batch_size: PositiveInt = 64
    steps: Annotated[int, Field(ge=2)] = 101  # top-n% grid 0..100 % of the IoU curves and NRA
    hit_threshold: Fraction = 0.5  # a concept map "hits" when its NRA exceeds this (CE-FAM)
    seed: int = 0


class Params(Section):
    """The whole params.yaml."""

    runtime: RuntimeParams = RuntimeParams()
    data: DataParams = DataParams()
    backbone: BackboneParams = BackboneParams()
    clip: ClipParams = ClipParams()
    toy_backbone: ToyBackboneParams = ToyBackboneParams()
    toy_clip: ToyClipParams = ToyClipParams()
    features: FeaturesParams = FeaturesParams()
    clip_images: ClipImagesParams = ClipImagesParams()
    circles: CirclesParams = CirclesParams()
    concepts: ConceptsParams = ConceptsParams()
    similarity: SimilarityParams = SimilarityParams()
    cbl: CblParams = CblParams()
    sparse: SparseParams = SparseParams()
    explain: ExplainParams = ExplainParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _cbl_layer_is_extracted(self) -> Params:
        if self.cbl.layer is not None and self.cbl.layer not in self.features.layers:
            raise ValueError(
                f"cbl.layer {self.cbl.layer!r} is not extracted; it must be one of features.layers "
                f"{list(self.features.layers)} (or null for the last of them)"
            )
        return self


def _format_errors(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; allowed keys are in lib/core/params.py)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f": {value!r}"
        lines.append(f"{key}{shown} — {message}")
    return f"{path}: invalid params\n  " + "\n  ".join(lines)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate the whole params file; raise :class:`ParamsError` naming every bad key."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_errors(path, exc)) from None


def params_hash(*sections: BaseModel | dict[str, Any] | str) -> str:
    """Stable short hash of the sections that determine an output (recorded as provenance)."""
    payload = [s.model_dump(mode="json") if isinstance(s, BaseModel) else s for s in sections]
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_hash(module: ModuleType) -> str:
    """Short hash of a module's source file: part of the fingerprint of data that module generates,
    so a resumed stage never keeps shards written by older code."""
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]
