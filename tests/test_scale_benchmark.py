"""benchmarks/scale.py at tiny N on CPU: every stage runs through its entry point (prepare on generated
JPEGs, stored at 80 px and cropped to 64 by the backbone) and the last line holds every stage's
measurements, every store's bytes per image and the ImageNet projections."""

from pathlib import Path

import open_clip
import pytest
import torch
import torchvision
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from benchmarks import scale
from lib.kernels.preprocess import Preprocess
from lib.models.clip_format import save_clip_dir
from lib.models.weights import save_backbone

SIZE, STORED = 64, 80  # model input, stored side (the profile's 224 of 256)
CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
KEYS = ("imgs", "tflops", "mfu", "vs_bare", "wait", "rss_mib", "gpu_mib", "hours_imagenet")
STORES = ("images", "features_layer3", "features_layer4", "features_logits", "clip_images", "circles", "salf_activations")


def test_tiny_cpu_run_prints_every_stage_key(tmp_path: Path, capsys) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet, clip = torchvision.models.resnet18(), open_clip.CLIP(**CLIP_CFG)  # 1000 ImageNet outputs: FaCT maps classes by name
    imagenet = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    save_clip_dir(tmp_path / "clip", clip, CLIP_CFG, Preprocess(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    # the backbone's view of the stored 80 px images: shortest side to 80, centre crop 64
    weights = save_backbone(tmp_path / "resnet18.pt", resnet, "torchvision:resnet18", 1000,
                            Preprocess(SIZE, imagenet.mean, imagenet.std, resize_size=STORED))
    values = scale.main([
        "--images", "20", "--prepare-images", "24", "--size", str(STORED), "--rows-per-shard", "8", "--classes", "4",
        "--jpeg-size", "96", "72",
        "--concept-texts", "3", "--sparse-rows", "24", "--sparse-classes", "4", "--sparse-batch", "8", "--sparse-epochs", "2",
        "--backbone", "torchvision:resnet18", "--backbone-weights", str(weights), "--clip-model", "tiny",
        "--clip-pretrained", f"local-dir:{tmp_path / 'clip'}", "--grid", "3", "--radius", "12", "--width", "2",
        "--concepts", "4", "--features-batch", "8", "--clip-batch", "8", "--circles-batch", "4", "--cbl-batch", "8",
        "--cbl-steps", "2", "--fact-batch", "8", "--sae-expansion", "0.25", "--sae-batch", "16", "--regions-batch", "2",
        "--regions-images", "2", "--bare-calls", "1", "--device", "cpu", "--precision", "fp32", "--workers", "1",
    ])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    printed = dict(pair.split("=") for pair in last.split())
    extra = {"circles_vs_reference", "prepare_jpeg_kib", "sparse_epoch_s_1m28", "total_hours_imagenet", "total_gb_imagenet"}
    stores = {f"store_{name}_{key}" for name in STORES for key in ("bytes_per_image", "gb_imagenet")}
    assert {f"{stage}_{key}" for stage in scale.STAGES for key in KEYS} | extra <= set(printed) == set(values)
    assert stores <= set(values), sorted(set(values) - stores)
    for stage in scale.STAGES:
        assert values[f"{stage}_imgs"] > 0 and values[f"{stage}_hours_imagenet"] > 0 and values[f"{stage}_rss_mib"] > 0
        if stage not in ("prepare", "concepts"):  # decoding and text encoding count no FLOPs
            assert values[f"{stage}_tflops"] > 0
    for stage in ("features", "clip_images", "circles", "cbl"):  # the stages measured against their bare model
        assert values[f"{stage}_vs_bare"] > 0 and 0 <= values[f"{stage}_wait"] < 1
    assert values["circles_vs_reference"] > 0 and values["prepare_jpeg_kib"] > 0
    # the image store holds the stored side (80 px), uint8 RGB (grainy JPEGs barely compress), plus labels and
    # metadata: about the raw bytes; a 224 or 64 px store would be 8x or 1.6x off
    assert 0.5 * STORED**2 * 3 < values["store_images_bytes_per_image"] < 1.1 * STORED**2 * 3
    # c*: one float32 per concept per row (4 concepts), random values barely compress
    assert values["store_salf_activations_bytes_per_image"] > 4 * 4 * 0.5
    # projections: a stage's hours are ImageNet's items at the measured rate
    assert values["prepare_hours_imagenet"] == pytest.approx(scale.IMAGENET_IMAGES / values["prepare_imgs"] / 3600)
    assert values["sparse_hours_imagenet"] == pytest.approx(80 * scale.IMAGENET_TRAIN / values["sparse_imgs"] / 3600)
    assert values["total_hours_imagenet"] == pytest.approx(sum(values[f"{s}_hours_imagenet"] for s in scale.STAGES))
