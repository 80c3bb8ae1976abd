"""Real photographs end to end, and a pretrained-size backbone keeping its own 1000 outputs.

scikit-image's sample photographs (shipped in its wheel: a cat, an espresso, a rocket) are cut into
a 3-class image folder whose class names are ImageNet classes, written three ways: a class name
("tabby"), a WordNet id ("n07920052", espresso) and a name in another case ("Missile"). Every
SALF-CBM stage runs on it through the CLI, with random-init real architectures at 64 px: a
torchvision ResNet-50 with its 1000-output head (saved as a local checkpoint with 64 px
preprocessing) and a ViT CLIP of ViT-B-32's shape, narrower and shallower. The backbone's head is
kept: the 3 classes map by name onto 3 of its 1000 outputs, acc_backbone is the accuracy of its
argmax among those 3, and explanations report its prediction among them.

`dvc repro` end to end on such a folder (no masks) with a ResNet-18 from a local file, in a copy of
the repository: every stage runs, the work that needs ground-truth masks (evaluate's scores, FaCT's
ground-truth matching) leaves stubs saying why, DVC sees every output, and the shipped toy models
are left alone.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torchvision
import yaml
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from lib.core.layout import Layout
from lib.core.skipped import no_masks
from lib.core.stores import open_store
from lib.data.manifest import read_manifest
from lib.kernels.preprocess import Preprocess
from lib.models.clip_format import save_clip_dir
from lib.models.weights import save_backbone
from tests.stage_cli import invoke

# folder name -> (scikit-image photo, ImageNet-1k output it names)
PHOTOS = {"tabby": ("chelsea.png", 281), "n07920052": ("coffee.png", 967), "Missile": ("rocket.jpg", 657)}
CLASSES = sorted(PHOTOS)  # the image folder's class order
OUTPUTS = [PHOTOS[c][1] for c in CLASSES]
CROPS, SIZE = 12, 64  # crops per photo; stored and model input size
CONCEPTS = ["fur", "whiskers", "cup", "saucer", "foam", "sky", "flame", "smoke", "metal", "wood", "stripes", "grass"]
CLIP_CFG = {  # ViT-B-32's layout (patch tokens, class token, text transformer), smaller
    "embed_dim": 128,
    "vision_cfg": {"image_size": SIZE, "patch_size": 16, "width": 192, "layers": 3, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
PARAMS = {
    "runtime": {"device": "cpu"},
    "data": {
        "kind": "imagefolder", "name": "photos", "image_size": SIZE, "rows_per_shard": 16,
        "imagefolder": {"root": "photos", "val_fraction": 0.25, "test_fraction": 0.25},
    },
    "backbone": {"arch": "torchvision:resnet50", "weights": "models/resnet50.pt"},
    "features": {"layers": ["layer3"], "batch_size": 12},
    "clip": {"model": "small-vit", "pretrained": "local-dir:models/clip"},
    "clip_images": {"autocast": False},
    "circles": {"grid": 3, "radius": 10.0, "width": 2.0, "batch_size": 8, "chunk": 72, "autocast": False},
    # a random CLIP's similarities are meaningless: keep every concept
    "concepts": {"file": "concepts.txt", "duplicate_threshold": 1.0, "class_similarity_threshold": 1.0, "min_top5_similarity": -1.0},
    "cbl": {"max_steps": 20, "eval_every": 5, "batch_size": 16, "cos3_threshold": -1.0},
    "sparse": {"n_lambdas": 4, "max_epochs": 20, "batch_size": 16, "target_nonzeros_per_class": 3},
    "explain": {"n_images": 3, "top_k": 2, "gallery_concepts": 2, "gallery_images": 2},
}
STAGES = ("prepare", "features", "clip-images", "circles", "concepts", "similarity", "cbl", "sparse", "explain")


def write_photo_folder(root: Path, crops: int = CROPS) -> None:
    """`crops` seeded crops (40-90 % of the short side, some mirrored) of each photo, as JPEG and PNG files."""
    data = importlib.resources.files("skimage") / "data"
    rng = np.random.default_rng(0)
    for name, (photo, _) in PHOTOS.items():
        (root / name).mkdir(parents=True)
        with Image.open(data / photo) as opened:
            image = opened.convert("RGB")
        for i in range(crops):
            side = int(min(image.size) * rng.uniform(0.4, 0.9))
            x, y = (int(rng.integers(0, limit - side + 1)) for limit in image.size)
            crop = image.crop((x, y, x + side, y + side)).resize((96, 96), Image.Resampling.BILINEAR)
            if i % 3 == 0:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / name / f"{i:02d}.{'jpg' if i % 2 else 'png'}")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with the photo folder, params, a concept list, the random ResNet-50 and CLIP;
    every stage of STAGES run on it."""
    root = tmp_path_factory.mktemp("photos")
    write_photo_folder(root / "photos")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (root / "concepts.txt").write_text("\n".join(CONCEPTS) + "\n")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet = torchvision.models.resnet50()  # random init, the 1000-output ImageNet head
        clip = open_clip.CLIP(**CLIP_CFG)
    imagenet = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()  # its normalisation, at 64 px
    save_backbone(root / "models" / "resnet50.pt", resnet, "torchvision:resnet50", 1000, Preprocess(SIZE, imagenet.mean, imagenet.std))
    save_clip_dir(root / "models" / "clip", clip, CLIP_CFG, Preprocess(SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    for stage in STAGES:
        result = invoke(root, stage)
        assert result.exit_code == 0, f"{stage}: {result.output}"
    return root


def stored(project: Path) -> tuple[Layout, np.ndarray, np.ndarray, np.ndarray]:
    """(layout, logits (N, 1000), labels (N,), test rows) of the project."""
    layout = Layout(project / "data" / "photos", project / "metrics")
    manifest = read_manifest(layout.manifest)
    test = manifest.loc[manifest["split"] == "test", "index"].to_numpy()
    return layout, open_store(layout.logits)["logits"][:], open_store(layout.images)["labels"][:], test


def test_every_stage_runs_on_real_photos(project: Path) -> None:
    layout, logits, labels, _ = stored(project)
    info = json.loads(layout.dataset_info.read_text())
    assert info["classes"] == CLASSES and np.bincount(labels).tolist() == [CROPS] * 3
    assert open_store(layout.features("layer3"))["features"].shape == (3 * CROPS, 1024, 4, 4)  # ResNet-50 layer3 at 64 px
    assert open_store(layout.similarity)["P"].shape == (3 * CROPS, len(CONCEPTS), 3, 3)
    assert len(list(layout.explain.glob("row*.json"))) == 3 and (layout.explain / "gallery.png").is_file()


def test_the_backbone_keeps_its_1000_outputs_and_the_classes_map_onto_three(project: Path) -> None:
    layout, logits, labels, test = stored(project)
    assert logits.shape == (3 * CROPS, 1000)
    mapping = open_store(layout.logits).attrs["class_map"]
    assert mapping == {"outputs": OUTPUTS, "n_outputs": 1000, "how": "by name (ImageNet-1k)"}
    metrics = json.loads(layout.salf_metrics.read_text())
    restricted = logits[test][:, OUTPUTS].argmax(axis=1)  # the argmax among the 3 mapped outputs
    assert metrics["acc_backbone"] == pytest.approx(float((restricted == labels[test]).mean()))
    unrestricted = logits[test].argmax(axis=1) == np.array(OUTPUTS)[labels[test]]
    assert metrics["acc_backbone_unrestricted"] == pytest.approx(float(unrestricted.mean()))
    for path in layout.explain.glob("row*.json"):  # the backbone's prediction among the mapped classes
        row, record = int(path.stem.removeprefix("row")), json.loads(path.read_text())
        assert record["backbone_predicted"] == int(logits[row, OUTPUTS].argmax())
        assert record["backbone_predicted_name"] == CLASSES[record["backbone_predicted"]]


def test_an_image_file_is_explained_with_the_backbone_prediction_of_its_stored_row(project: Path) -> None:
    layout, logits, _, test = stored(project)
    row = int(test[0])
    Image.fromarray(open_store(layout.images)["images"][row]).save(project / "picture.png")  # lossless: same pixels
    result = invoke(project, "explain", "--index", str(row), "--image", "picture.png")
    assert result.exit_code == 0, result.output
    from_row = json.loads((layout.explain_adhoc / f"row{row}.json").read_text())
    from_file = json.loads((layout.explain_adhoc / "file0_picture.json").read_text())
    assert from_file["backbone_predicted"] == from_row["backbone_predicted"] == int(logits[row, OUTPUTS].argmax())
    assert from_file["logit"] == pytest.approx(from_row["logit"], abs=1e-3)


def test_classes_the_backbone_lacks_and_a_toy_backbone_on_photos_are_clear_errors(project: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    (tmp_path / "data" / "photos").mkdir(parents=True)  # features fails on the classes, before it reads any image
    shutil.copy(project / "data" / "photos" / "dataset.json", tmp_path / "data" / "photos")
    (tmp_path / "models").symlink_to(project / "models")
    (tmp_path / "map.csv").write_text("dataset_class,backbone_index\ntabby,281\n")
    cases = [
        ({"class_map": "map.csv"}, "backbone.class_map: 'map.csv' — map.csv: 2 dataset classes are not mapped: Missile, n07920052"),
        ({"arch": "toy:cnn", "weights": None}, "backbone.arch: 'toy:cnn' — backbone toy:cnn is a toy-world model"),
    ]
    for backbone, message in cases:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "backbone": {**params["backbone"], **backbone}}))
        result = invoke(tmp_path, "features")
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert message in text and ("backbone.new_head: true" in text)


def test_new_head_explains_the_features_without_the_backbone_classes(project: Path, tmp_path: Path) -> None:
    """backbone.new_head: the classes are not mapped (tests/test_classes.py: nor need they be); acc_backbone
    and the backbone's predictions are left out, SALF-CBM's final layer is trained as always."""
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["backbone"]["new_head"] = True
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("features", "sparse", "explain"):
        result = invoke(copy, stage)
        assert result.exit_code == 0, f"{stage}: {result.output}"
        if stage == "features":
            assert "a different model from the backbone's own classifier" in " ".join(result.output.split())
    layout = Layout(copy / "data" / "photos", copy / "metrics")
    assert open_store(layout.logits).attrs["class_map"] is None
    metrics = json.loads(layout.salf_metrics.read_text())
    assert metrics["acc_backbone"] is None and metrics["acc_backbone_unrestricted"] is None and metrics["acc_sparse"] is not None
    records = [json.loads(p.read_text()) for p in layout.explain.glob("row*.json")]
    assert records and all(r["backbone_predicted"] is None and r["backbone_predicted_name"] is None for r in records)


# ---------------------------------------------------------------------------------------------
# `dvc repro` on the photo folder (no masks) with a torchvision ResNet-18 from a local file, in a
# copy of the repository: every stage that applies runs, the ones that need masks leave a stub
# saying why, and the shipped toy models are left alone.
REPO = Path(__file__).resolve().parents[1]
REPRO_CROPS = 6  # per class: 2 train, 2 val, 2 test at the folder's 25 % / 25 % val / test shares
REPRO_PARAMS = {  # merged into the repository's params.yaml (its toy CLIP, concept list and templates kept)
    "runtime": {"device": "cpu", "num_workers": 0},
    "data": {
        "kind": "imagefolder", "name": "photos", "image_size": SIZE, "rows_per_shard": 8,
        "imagefolder": {"root": "photos", "val_fraction": 0.25, "test_fraction": 0.25},
    },
    "backbone": {"arch": "torchvision:resnet18", "weights": "models/resnet18.pt"},
    "features": {"layers": ["layer2", "layer3"], "batch_size": 8, "autocast": False},
    "clip_images": {"batch_size": 8, "autocast": False},
    "circles": {"grid": 3, "batch_size": 8, "autocast": False},
    "concepts": {"min_top5_similarity": -1.0},  # the toy CLIP on photos: keep every concept
    "cbl": {"max_steps": 10, "eval_every": 5, "cos3_threshold": -1.0},
    "sparse": {"n_lambdas": 4, "max_epochs": 5},
    "explain": {"n_images": 2, "gallery_concepts": 2, "gallery_images": 2},
    "cefam": {"layers": ["layer2", "layer3"], "translator": {"max_epochs": 3, "batch_size": 8},
              "regions": {"batch_size": 8, "n_figures": 1, "contribution_concepts": 2, "top_k": 4}},
    "fact": {"sae": {"expansion": 16 / 256, "k": 2, "aux_k": 4, "dead_epochs": 2, "epochs": 1, "warmup_epochs": 0.2,
                     "decay_epochs": 0.5, "batch_size": 64, "checkpoint_every": 5},  # 16 latents on layer3's 256 channels
             "c2": {"max_concepts": 2}, "explain": {"n_images": 2, "gallery_concepts": 2, "gallery_images": 2}},
    "evaluate": {"batch_size": 8, "steps": 21, "cam_methods": ["gradcam"]},
}
TOY_MODELS = ("models/toy/cnn.pt", "models/toy/bcos.pt", "models/toy/clip/open_clip_pytorch_model.bin")


def _merge(base: dict, update: dict) -> dict:
    return {**base, **{k: _merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in update.items()}}


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com", "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)  # a hang, not a slow machine


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def photo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository with the working tree's files (toy models and dvc.lock included), the
    toy models' lock entries current (as after the lead's rerun), and the photo folder, a random
    ResNet-18 and REPRO_PARAMS in place; not reproduced yet."""
    repo = tmp_path_factory.mktemp("photo_repo") / "repo"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():  # deleted-but-tracked files are listed too
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    for args in (("git", "init", "-q"), ("git", "add", "-A"), ("git", "commit", "-qm", "clone"),
                 # code the toy models do not run may have changed since dvc.lock was written: mark them current
                 ("dvc", "commit", "-f", "toy_backbone", "toy_clip")):
        done = _run(repo, *args)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    (repo / "photos").mkdir()
    write_photo_folder(repo / "photos", REPRO_CROPS)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18()  # random init, the 1000-output ImageNet head
    imagenet = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    save_backbone(repo / "models" / "resnet18.pt", resnet, "torchvision:resnet18", 1000, Preprocess(SIZE, imagenet.mean, imagenet.std))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, REPRO_PARAMS), sort_keys=False))
    return repo


def test_dvc_repro_on_an_image_folder_skips_what_needs_masks_and_leaves_the_toy_models(photo_repo: Path) -> None:
    repo = photo_repo
    before = {name: _digest(repo / name) for name in TOY_MODELS}
    done = _run(repo, "dvc", "repro")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    ran = set(re.findall(r"Running stage '(\w+)'", log))
    assert not ran & {"toy_backbone", "toy_clip"} and {"prepare", "evaluate", "contributions", "stats"} <= ran, ran
    assert {name: _digest(repo / name) for name in TOY_MODELS} == before
    # the mask-dependent work says so in one line each, and its outputs say why
    reason = no_masks("imagefolder")
    lines = log.splitlines()
    kept = "accuracy paths of salf -> metrics/plots/accuracy_nonzeros.csv"
    assert f"evaluate: concept maps and segmentation skipped: {reason}; {kept}" in lines, log
    assert any(line.startswith("contributions: ") and line.endswith(f"; ground-truth matching skipped: {reason} -> metrics/fact.json")
               for line in lines), log
    assert json.loads((repo / "metrics" / "evaluate.json").read_text()) == {"skipped": reason}
    assert json.loads((repo / "data" / "photos" / "fact" / "matching.json").read_text()) == {"concepts": [], "skipped": reason}
    assert (repo / "metrics" / "plots" / "iou_curves.csv").read_text() == "method,top_percent,iou\n"
    accuracy = pd.read_csv(repo / "metrics" / "plots" / "accuracy_nonzeros.csv")  # what needs no masks is kept
    assert set(accuracy["method"]) == {"salf"} and len(accuracy) >= 1
    fact = json.loads((repo / "metrics" / "fact.json").read_text())
    assert (fact["gt_concepts"], fact["gt_found"], fact["match_score"]) == (0, 0, None) and fact["acc_backbone"] is not None
    # nothing written outside the outputs, and DVC reads every metric and plot
    status = _run(repo, "dvc", "status")
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
    metrics = _run(repo, "dvc", "metrics", "show", "--json")
    assert metrics.returncode == 0, metrics.stderr
    plots = _run(repo, "dvc", "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
