"""benchmarks/scale.py at tiny N on CPU: every stage runs through its entry point and the last line
holds every stage's measurements."""

from pathlib import Path

import open_clip
import torch
import torchvision
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from benchmarks import scale
from lib.kernels.preprocess import Preprocess
from lib.models.clip_format import save_clip_dir
from lib.models.weights import save_backbone

SIZE = 64
CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
KEYS = ("imgs", "tflops", "mfu", "vs_bare", "wait", "rss_mib", "gpu_mib", "hours_1m28")


def test_tiny_cpu_run_prints_every_stage_key(tmp_path: Path, capsys) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet, clip = torchvision.models.resnet18(), open_clip.CLIP(**CLIP_CFG)  # 1000 ImageNet outputs: FaCT maps classes by name
    imagenet = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    weights = save_backbone(tmp_path / "resnet18.pt", resnet, "torchvision:resnet18", 1000, Preprocess(SIZE, imagenet.mean, imagenet.std))
    save_clip_dir(tmp_path / "clip", clip, CLIP_CFG, Preprocess(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    values = scale.main([
        "--images", "20", "--size", str(SIZE), "--rows-per-shard", "8", "--classes", "4",
        "--backbone", "torchvision:resnet18", "--backbone-weights", str(weights), "--clip-model", "tiny",
        "--clip-pretrained", f"local-dir:{tmp_path / 'clip'}", "--grid", "3", "--radius", "12", "--width", "2",
        "--concepts", "4", "--features-batch", "8", "--clip-batch", "8", "--circles-batch", "4", "--cbl-batch", "8",
        "--cbl-steps", "2", "--fact-batch", "8", "--sae-expansion", "0.25", "--sae-batch", "16", "--regions-batch", "2",
        "--regions-images", "2", "--bare-calls", "1", "--device", "cpu", "--precision", "fp32", "--workers", "1",
    ])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    printed = dict(pair.split("=") for pair in last.split())
    expected = {f"{stage}_{key}" for stage in scale.STAGES for key in KEYS} | {"circles_vs_reference"}
    assert set(printed) == set(values) == expected
    for stage in scale.STAGES:
        assert values[f"{stage}_imgs"] > 0 and values[f"{stage}_tflops"] > 0 and values[f"{stage}_rss_mib"] > 0
    for stage in ("features", "clip_images", "circles", "cbl"):  # the stages measured against their bare model
        assert values[f"{stage}_vs_bare"] > 0 and 0 <= values[f"{stage}_wait"] < 1
    assert values["circles_vs_reference"] > 0
