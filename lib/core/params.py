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


# Decompression-bomb guard of image decoding (lib/data/decode.py): a file with more pixels is a bad
# image; null: no limit. The default is Pillow's own (decode.DEFAULT_MAX_PIXELS, tested equal).
MaxPixels = PositiveInt | None
DEFAULT_MAX_PIXELS = 89_478_485
# Real images are stored in a seeded random order within each split (lib/data/imagefolder.py
# shuffle_within_splits), so every shard and every streamed batch mixes the classes; null keeps the
# list's (or the sorted folders') order. The toy world's rows are independent draws already.
RowShuffle = int | None


class ImageFolderParams(Section):
    """A directory tree root/<class>/<image>, or a CSV/parquet list of (path, label[, split])."""

    root: str | None = None
    list_file: str | None = None
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1
    on_bad_image: Literal["error", "skip"] = "error"
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS
    shuffle_seed: RowShuffle = 0

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
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS
    shuffle_seed: RowShuffle = 0


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
    # threads that read stores ahead of compute, in every stage (lib/core/streams.py); in prepare, the
    # DataLoader worker processes that decode image files. 0: read/decode in the stage's own thread
    num_workers: Annotated[int, Field(ge=0)] = 2

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
    # The backbone keeps its own outputs; the dataset's classes map onto them (lib/models/classes.py):
    # by name (ImageNet WordNet id or class name; the toy classes) unless class_map names a CSV
    # "dataset_class,backbone_index". new_head: the dataset's classes are not the backbone's; they get
    # a new head (SALF-CBM's final layer) and acc_backbone, the backbone's predictions and CAMs are skipped.
    class_map: str | None = None
    new_head: bool = False

    @model_validator(mode="after")
    def _one_mapping(self) -> BackboneParams:
        if self.class_map is not None and self.new_head:
            raise ValueError("set class_map (map the classes onto the backbone's outputs) or new_head: true (a new head), not both")
        return self


class ClipParams(Section):
    model: str = "toy-clip"
    pretrained: str | None = "local-dir:models/toy/clip"


class ToyClassifierParams(Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    augment: bool = True
    loss: Literal["ce", "bce"] = "ce"  # B-cos models train with binary cross-entropy


# The toy models' own image side: they train on their own draws of the toy world at this size, so
# changing data.image_size (real data) never retrains them; the toy data's 64 px by default.
ToyImageSize = Annotated[int, Field(ge=32, le=1024)]


class ToyBackboneParams(Section):
    """Toy backbones are trained on their own draw of the toy world (seeded), not on data/<name>."""

    seed: int = 1
    image_size: ToyImageSize = 64
    n_train: PositiveInt = 8000
    n_val: PositiveInt = 1000
    cnn: ToyClassifierParams = ToyClassifierParams()
    bcos: ToyClassifierParams = ToyClassifierParams(weight_decay=0.0, loss="bce")


class ToyClipParams(Section):
    """The toy teacher CLIP; its ring geometry is its own, so circles params can change freely."""

    data_seed: int = 1  # train draw: generate(n_train, data_seed); val draw: data_seed + 1
    seed: int = 0  # initialisation and batch sampling
    image_size: ToyImageSize = 64  # side of its toy-world draws (its vision tower's input is 64 px, lib/toy/models/configs)
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
    # the backbone forward in bf16/fp16 (lib/core/device.py; auto: where the hardware runs it natively): ~2-3x faster
    # on GPUs; false keeps fp32 (the stores are fp16 either way, but bf16 math rounds more than fp16 storage)
    autocast: Autocast = False


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
    """Concept list, prompt template per concept type, and LF-CBM's filters (lib/pipeline/concept_list.py).

    Defaults are LF-CBM's (max length 30, class similarity 0.85, duplicates 0.9, top-5 activation
    0.25: train_cbm.py's clip_cutoff; its ImageNet run used 0.28); params.yaml sets the toy CLIP's.
    A null class or duplicate threshold switches that filter off (LF-CBM's published lists, e.g.
    imagenet_filtered.txt, have been through both already). `sentence_model`: a local
    sentence-transformers model folder (LF-CBM: all-mpnet-base-v2); the two similarity filters then
    use LF-CBM's mix (sentence cosine + 3 CLIP cosine) / 4 instead of CLIP's alone.
    """

    file: str = "concepts/toy.txt"
    default_template: str = "{}"
    templates: dict[str, str] = Field(default_factory=dict)
    max_chars: PositiveInt = 30
    duplicate_threshold: Fraction | None = 0.9
    class_similarity_threshold: Fraction | None = 0.85
    min_top5_similarity: Annotated[float, Field(ge=-1, le=1)] = 0.25
    sentence_model: str | None = None

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
    # also store the CLIP's last spatial feature map ("dense", N x D' x h x w): FaCT's C²-Score encodes
    # attributions with it; false skips it (and the C²-Score) on large runs
    dense: bool = True


class SimilarityParams(Section):
    """P = cos(red-circle embeddings, text embeddings); materialize false leaves it to later stages.

    "auto" stores P only when its size (N M G^2 fp16 values) is at most max_stored_gb: at ImageNet
    scale (1.28 M images, ~4.7 k concepts, 7 x 7) it would take ~600 GB, while the circles store it is
    computed from holds 1.28 M x 49 x 512 fp16 (~64 GB) and one matmul per batch rebuilds it.
    """

    materialize: Literal["auto"] | bool = "auto"
    max_stored_gb: PositiveFloat = 20.0
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
    """SALF-CBM's final layer (and the Table 1 baselines' layers, fitted the same way)."""

    pooling: Literal["avg", "max", "softmax"] = "softmax"
    alpha: Annotated[float, Field(gt=0, le=1)] = 0.99
    # None: fit the lambda path and pick by val accuracy within target_nonzeros_per_class; a value:
    # fit that lambda alone from W = 0 (LF-CBM's and SALF-CBM's setting, e.g. 1e-4 for ImageNet)
    lam: PositiveFloat | None = None
    n_lambdas: PositiveInt = 40
    lambda_min_ratio: Annotated[float, Field(gt=0, lt=1)] = 1e-3
    target_nonzeros_per_class: PositiveFloat = 5.0
    max_epochs: PositiveInt = 1000
    tol: PositiveFloat = 1e-5
    batch_size: PositiveInt = 256  # SAGA minibatch; >= 1024 left toy-sized paths unconverged after 200 epochs
    # "auto": 1/L(B) from the data, started at the exact lambda_max solution (ours); a number: that fixed
    # step from zero weights, bias and SAGA table, as LF-CBM's glm_saga call (step 0.1) runs it
    step_size: Literal["auto"] | PositiveFloat = "auto"
    seed: int = 0
    dense_lambda: Annotated[float, Field(ge=0)] = 1e-4  # L2 strength of the dense comparison layer
    # c* of a split up to this size is held on the device; a larger one streams from its store every epoch
    in_memory_mb: Annotated[float, Field(ge=0)] = 1024.0
    # SALF-CBM Table 1's baselines on the same features (lib/methods/salf/baselines.py): the backbone's
    # pooled features and LF-CBM, each with this final layer
    baselines: bool = True


class ExplainParams(Section):
    n_images: PositiveInt = 8
    top_k: PositiveInt = 5
    gallery_concepts: PositiveInt = 6
    gallery_images: PositiveInt = 6
    seed: int = 0


# --------------------------------------------------------------------------------------------
# CE-FAM
class TranslatorParams(Section):
    """CE-FAM's translator (lib/methods/cefam/training.py): z_cat of cefam.layers -> the CLIP image
    embedding. Paper §4.1 / the authors' train.py: SGD lr 0.1, lr x0.1 after 4 epochs without a
    better val loss, early stop after 10, lam 0.001. The best, the plateau and the stop use val."""

    hidden: tuple[PositiveInt, ...] | None = None  # hidden widths; None = default_hidden(sum of channels, CLIP dim)
    lam: Annotated[float, Field(ge=0)] = 1e-3  # weight of the concept-score MSE; 0 = concept-free (any concept list later)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    batch_size: PositiveInt = 256
    max_epochs: PositiveInt = 150
    plateau_patience: PositiveInt = 4  # epochs without a better val loss before lr *= plateau_factor
    plateau_factor: Annotated[float, Field(gt=0, lt=1)] = 0.1
    patience: PositiveInt = 10  # epochs without a better val loss before stopping
    seed: int = 0
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # only when the manifest has no val split
    in_memory_mb: Annotated[float, Field(ge=0)] = 1024.0  # a split's pooled features up to this size stay on the device
    # the regression target: "raw" is CLIP's unnormalised image embedding (the authors' get_image_features);
    # "normalized" the unit embedding (the concept-score term then weighs about |E_image|^2 times more)
    targets: Literal["raw", "normalized"] = "raw"
    # every epoch: RandomResizedCrop + horizontal flip of the training images, z_cat from the frozen backbone and
    # the target from the frozen CLIP on the same crop (the authors' train.py); false: the stored features
    augment: bool = True
    crop_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (0.08, 1.0)  # crop area share

    @model_validator(mode="after")
    def _crop_scale_ordered(self) -> TranslatorParams:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale must be (low, high) with low <= high; got {list(self.crop_scale)}")
        return self


class RegionsParams(Section):
    """CE-FAM regions, association scores and contributions of every image of evaluate.split
    (lib/methods/cefam/regions_stage.py)."""

    layers: Annotated[tuple[str, ...], Field(min_length=1)] | None = None  # explained layers; None = all the translator's
    # Grad-CAM weights: "total" backpropagates S^t through the backbone (the paper's and the authors' Grad-CAM);
    # "jacobian" differentiates the translator only (exact for the last layer, one Jacobian per image)
    beta: Literal["total", "jacobian"] = "total"
    top_k: PositiveInt = 20  # K: channels masked one by one (association and contribution)
    candidates: PositiveInt = 4  # layers kept per concept by association score (cefam_best4 in evaluate)
    score: Literal["softmax", "sigmoid", "cosine"] = "softmax"  # what the association masking watches (softmax: CLIP)
    # area of the masking curves: right = the authors' sum of d_j / K (utils/cefam.py); trapezoid = ours (the
    # paper says "AUC" only)
    rule: Literal["trapezoid", "right"] = "right"
    contribution_concepts: PositiveInt = 8  # concepts per image (highest S^t) whose contribution is computed (authors: 8)
    # masked channels before the last layer: spatial = each map becomes its own spatial mean (the authors' mask_predict);
    # mean = the paper's m^l (the image's channel mean of z^l). The last layer always takes m^l (both agree there).
    contribution_fill: Literal["mean", "spatial"] = "spatial"
    # negative contributions: drop = left out of the explanation, stored as 0 (the authors' positive_only);
    # keep = stored (the paper's text: "a negative contribution", Fig. 7)
    negatives: Literal["drop", "keep"] = "drop"
    batch_size: PositiveInt = 32
    chunk: PositiveInt = 64  # (image, concept) pairs per tail call (contributions) and concepts per association forward
    # beta "total": rows per batched backward, or tangents per vmapped JVP in forward mode; None = sized for the device
    # (backward: CPU 1, plain backwards, CUDA by free memory; forward: 512 MiB of tangents on the CPU)
    beta_chunk: PositiveInt | None = None
    n_figures: Annotated[int, Field(ge=0)] = 8  # explanation PNGs (seeded images of the split)
    figure_concepts: PositiveInt = 4  # concepts per PNG, by |contribution|
    # of those images, how many also get every layer's maps, the masking curves and the IoU curves (3 PNGs each)
    figure_details: Annotated[int, Field(ge=0)] = 2
    seed: int = 0


class CefamParams(Section):
    """CE-FAM (lib/methods/cefam): the translator stage trains h, the regions stage explains."""

    layers: Annotated[tuple[str, ...], Field(min_length=1)] | None = None  # z_cat's layers, in order; None = features.layers
    translator: TranslatorParams = TranslatorParams()
    regions: RegionsParams = RegionsParams()


# --------------------------------------------------------------------------------------------
# FaCT
class FactSaeParams(Section):
    """FaCT's bias-free TopK SAE and its training (lib/methods/fact/sae.py, train.py, sae_stage.py).

    Defaults are FaCT's (m-parchami/FaCT train.sh and fact/utils/utils.py: 8 latents per channel, k 16,
    aux-k 256, batch 32768, lr 1e-3, 16 epochs of the training vectors with warm-up 1 and cosine
    from 2, dead after half an epoch, the checkpoint with the best spliced val accuracy); params.yaml
    sets the toy world's, profiles/fact-paper.yaml FaCT's on the toy world."""

    expansion: PositiveFloat = 8.0  # latents per channel of fact.layer: J = round(expansion * C)
    k: PositiveInt = 16
    aux_k: Annotated[int, Field(ge=0)] | None = None  # dead latents in the aux-k loss; None = min(256, J // 2)
    aux_coef: Annotated[float, Field(ge=0)] = 1 / 32
    dead_epochs: PositiveFloat = 0.5  # epochs of training vectors without being chosen by the top-k: dead
    epochs: PositiveFloat = 16.0  # of the training vectors (an epoch is n_vectors / batch_size steps)
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0  # linear warm-up, constant until decay_epochs,
    decay_epochs: Annotated[float, Field(ge=0)] = 2.0  # then cosine down to min_lr_factor * lr at `epochs`
    batch_size: PositiveInt = 32768  # training vectors per step
    lr: PositiveFloat = 1e-3
    min_lr_factor: Fraction = 0.0
    grad_clip: PositiveFloat = 1.0
    checkpoint_every: PositiveInt = 500  # steps between resumable checkpoints
    buffer_shards: PositiveInt = 4  # shards of training vectors shuffled together: the stream's memory
    checkpoint: str | None = None  # a FaCT-format SAE state dict (.pt) to use instead of training

    @model_validator(mode="after")
    def _consistent(self) -> FactSaeParams:
        if self.warmup_epochs > self.decay_epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be <= decay_epochs ({self.decay_epochs})")
        return self

    def n_latents(self, channels: int) -> int:
        """J for a layer of `channels` channels."""
        return max(1, round(self.expansion * channels))

    def aux_k_for(self, latents: int) -> int:
        """aux_k, or FaCT's 256 capped at half the latents when unset."""
        return min(256, latents // 2) if self.aux_k is None else self.aux_k


class FactC2Params(Section):
    """FaCT's C²-Score (lib/methods/fact/c2.py, featurizers.py), the authors' definition; defaults are
    theirs except the upsampler (bilinear here; they use LoftUp) and that DINOv2 needs a local file."""

    featurizer: Literal["gt", "backbone", "clip", "timm"] = "timm"  # dense features the maps are encoded with
    layer: str | None = None  # featurizer backbone: a features.layers layer; None = the first of them
    timm_model: str = "vit_small_patch14_dinov2"  # featurizer timm: the model (the authors' DINOv2-S)
    weights: str | None = None  # featurizer timm: its local weights file (required; nothing is downloaded)
    image_size: PositiveInt = 224  # featurizer timm: images are resized to this side for it
    top_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05  # a concept's images: top max(5 % of present, min_images)
    min_images: PositiveInt = 10
    min_count: Annotated[int, Field(ge=2)] = 2  # concepts with fewer images are not scored
    mean_min_images: Annotated[int, Field(ge=2)] = 5  # the mean (c2) is over the concepts with at least this many
    extent_mass: Annotated[float, Field(gt=0, le=1)] = 0.8  # spatial extent: pixels holding this share of a map's mass
    max_concepts: PositiveInt | None = None  # score a seeded sample of this many selected concepts; None = all (authors)


class FactExplainParams(Section):
    """FaCT's explanation PNGs and concept galleries (lib/methods/fact/explain.py)."""

    n_images: PositiveInt = 8  # test images explained (seeded sample)
    top_k: PositiveInt = 5  # concepts per explanation, by contribution
    gallery_concepts: PositiveInt = 6  # concepts in the gallery (seeded sample of the alive ones)
    gallery_images: PositiveInt = 6  # top images per gallery concept, by presence
    seed: int = 0
    logit: Annotated[int, Field(ge=0)] | None = None  # explain this dataset class's logit in every image; None = the prediction
    concepts: tuple[Annotated[int, Field(ge=0)], ...] | None = None  # latents of the gallery and local-and-global figures; None = a sample
    smooth: Annotated[int, Field(ge=0)] = 3  # B-cos colour maps: alpha smoothing kernel (the authors' figures: 3; 0 = none)
    alpha_percentile: Annotated[float, Field(gt=0, le=100)] = 99.5  # B-cos colour maps: alpha = ||W|| / this percentile


class FactParams(Section):
    """FaCT (lib/methods/fact): sae_data samples training vectors, sae trains the SAE, contributions
    explains the test split (statistics, metrics, C²-Score, the latent of each ground-truth concept)."""

    layer: str | None = None  # backbone layer (one of features.layers); None = the last of them
    seed: int = 0
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # only when the manifest has no val split
    batch_size: PositiveInt = 64  # images per forward/backward pass
    positions_budget: PositiveInt = 36864  # per image min(budget // C, H * W) positions (FaCT: 72 x 512)
    sae: FactSaeParams = FactSaeParams()
    completeness_tol: PositiveFloat = 1e-4  # largest relative completeness error accepted on a dynamic-linear (B-cos) tail
    completeness_check_images: PositiveInt | None = None  # images per batch held against the frozen-tail reference (None: all)
    c2: FactC2Params = FactC2Params()
    match_threshold: Annotated[float, Field(ge=-1, le=1)] = 0.5  # a ground-truth concept "found" a latent above this val correlation
    explain: FactExplainParams = FactExplainParams()


class EvaluateParams(Section):
    """Scores every registered method's maps against ground-truth masks (lib/evaluate)."""

    split: Literal["train", "val", "test"] = "test"
    max_images: PositiveInt | None = None  # first N images of the split; None = all
    cam_methods: tuple[Literal["gradcam", "gradcam++", "scorecam"], ...] = ("gradcam", "gradcam++")
    cam_layer: str | None = None  # None = the last of features.layers
    batch_size: PositiveInt = 64
    steps: Annotated[int, Field(ge=2)] = 101  # top-n grid 0..100 % of the IoU curves and NRA; its first step is refined to single pixels
    hit_threshold: Fraction = 0.5  # a concept map "hits" when its NRA exceeds this (CE-FAM)
    # concept-map scoring (lib/metrics/spatial.py): "paper" = eq. 13 as written (keys nra, epg, hit, auc*);
    # "authors" = the authors' evaluate.py bookkeeping (nra_authors, epg_authors, hit_authors, auc*_authors)
    protocol: Annotated[tuple[Literal["paper", "authors"], ...], Field(min_length=1)] = ("paper", "authors")
    seed: int = 0

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a protocol twice: {list(value)}")
        return value


class CompareParams(Section):
    """Every method side by side against the true concept effects (lib/compare; toy world)."""

    max_images: PositiveInt | None = None  # first N images of evaluate.split get counterfactuals (~20 forwards each); None = all
    n_figures: Annotated[int, Field(ge=0)] = 6  # side-by-side figures of a seeded sample of those images (evaluate.seed)
    # deletion / insertion curves (lib/compare/curves.py) on the first curve_images of those images
    curve_images: PositiveInt = 16  # each costs a dozen backbone forwards per method and fill (pixel level)
    concept_steps: PositiveInt = 5  # concepts removed (deletion) or put back (insertion), one per step, in each method's order
    pixel_fractions: tuple[Annotated[float, Field(gt=0, le=1)], ...] = (0.1, 0.25, 0.5)  # shares of pixels deleted

    @field_validator("pixel_fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"must be a non-empty, strictly increasing list of shares in (0, 1]; got {list(value)}")
        return value

    @model_validator(mode="after")
    def _curve_images(self) -> CompareParams:
        if self.max_images is not None and self.curve_images > self.max_images:
            raise ValueError(f"compare.curve_images ({self.curve_images}) must be at most compare.max_images ({self.max_images}): "
                             "the curves use images that have counterfactuals")
        return self


class StatsParams(Section):
    """Every concept method's statistics, reduced with dask (lib/stats)."""

    scheduler: str = "threads"  # "threads" (local) or a dask.distributed scheduler address, e.g. tcp://host:8786
    top_images: PositiveInt = 10  # images listed per concept, by presence

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        if value != "threads" and "://" not in value:
            raise ValueError("must be 'threads' or a dask.distributed scheduler address such as 'tcp://host:8786'")
        return value


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
    stats: StatsParams = StatsParams()
    compare: CompareParams = CompareParams()
    cefam: CefamParams = CefamParams()
    fact: FactParams = FactParams()

    @model_validator(mode="after")
    def _cbl_layer_is_extracted(self) -> Params:
        if self.cbl.layer is not None and self.cbl.layer not in self.features.layers:
            raise ValueError(
                f"cbl.layer {self.cbl.layer!r} is not extracted; it must be one of features.layers "
                f"{list(self.features.layers)} (or null for the last of them)"
            )
        return self

    @model_validator(mode="after")
    def _fact_layer_is_extracted(self) -> Params:
        if self.fact.layer is not None and self.fact.layer not in self.features.layers:
            raise ValueError(
                f"fact.layer {self.fact.layer!r} is not extracted; it must be one of features.layers "
                f"{list(self.features.layers)} (or null for the last of them)"
            )
        return self

    @model_validator(mode="after")
    def _cefam_layers_are_extracted(self) -> Params:
        missing = [layer for layer in self.cefam.layers or () if layer not in self.features.layers]
        if missing:
            raise ValueError(
                f"cefam.layers {missing} are not extracted; each must be one of features.layers "
                f"{list(self.features.layers)} (add it there: the features stage checks the backbone has it), or null for all of them"
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


def _yaml_where(error: yaml.YAMLError) -> str:
    """' at line L, column C: <problem> (<context> at line L)' on one line, from a YAML error's marks."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return f": {' '.join(str(error).split())}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    where = f" ({context} at line {context_mark.line + 1})" if context and context_mark else ""
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}{where}"


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate the whole params file; raise :class:`ParamsError` naming every bad key."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML{_yaml_where(exc)}") from exc
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
