"""SALF-CBM stages end to end on a tiny synthetic world: cbl, sparse, explain/probe/intervene, evaluate.

The world: noise images through a random-init toy CNN give features F (layer2: (N, 64, 4, 4));
concept k's similarity map P_k is a fixed 1x1 conv of F sampled at the 3x3 grid's circle centres
(lib.kernels.registration; so the bottleneck can learn it), squeezed into a CLIP-like
range (0.2 +- 0.02); a fifth concept "noise" is unrelated to F. The label is the argmax of the
pooled maps of concepts 0-2, so class k's rule is {concept k}. Circle and text embeddings are
built so that their cosines are exactly P: the on-the-fly target must equal the materialised one.
"""

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr
from PIL import Image

from lib.core.distributed import Ranks
from lib.core.layout import Layout
from lib.core.params import load_params
from lib.core.schema import (
    CIRCLES,
    CONTRIBUTION,
    IMAGE_EMB,
    PRED_BACKBONE,
    PRED_MODEL,
    PRESENCE,
    STATS_IMAGE,
    STATS_LABEL,
    TEXT_EMB,
    P,
    clip_provenance,
    images_provenance,
    view_provenance,
)
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.data.manifest import read_manifest
from lib.evaluate.adapters import METHODS
from lib.evaluate.adapters.salf import SalfMaps
from lib.evaluate.registry import EvalBatch, EvalContext
from lib.evaluate.truth import GroundTruth
from lib.kernels.preprocess import Preprocess
from lib.kernels.registration import Registration, sample_features
from lib.methods.salf.artifacts import SalfModel
from lib.methods.salf.data import glm_batches, pair_batches, registration_of, salf_splits, similarity_target
from lib.methods.salf.pooling import Standardiser, pool_concepts
from lib.models.backbones import load_backbone
from lib.models.classes import CLASS_MAP_ATTR, ClassMap
from lib.models.layers import extract_layers
from lib.models.weights import save_backbone
from lib.pipeline.stored_concepts import read_concepts
from lib.toy.models.cnn import build_toy, toy_preprocess
from tests.stage_cli import invoke

N, TRAIN, VAL = 160, 100, 30  # rows 0-99 train, 100-129 val, 130-159 test
GRID, SIZE, ROWS_PER_SHARD = 3, 16, 32
CLIP_VIEW = Preprocess(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # CLIP sees the 16 px images upscaled to 24 px
CONCEPTS = ["blue", "star", "sand", "water", "noise"]  # "noise" is unrelated to the features
CLASSES = ["blue_thing", "star_thing", "sand_scene"]
GT_CONCEPTS = [
    ("blue", "color"), ("star", "shape"), ("sand", "background"), ("water", "background"), ("grass", "background")
]
INFO = {  # dataset.json: ground-truth concepts (no "noise"; a "grass" the model lacks), class k's rule = {concept k}
    "kind": "toy",
    "classes": CLASSES,
    "concepts": [{"name": n, "type": t} for n, t in GT_CONCEPTS],
    "rules": [
        {"class_id": k, "class_name": CLASSES[k], "concept_id": k, "concept": name, "concept_type": kind}
        for k, (name, kind) in enumerate(GT_CONCEPTS[:3])
    ],
}
PARAMS = {
    "runtime": {"device": "cpu"},
    "data": {"name": "syn", "image_size": SIZE, "rows_per_shard": ROWS_PER_SHARD},
    "backbone": {"arch": "toy:cnn", "weights": "cnn.pt"},
    "features": {"layers": ["layer2", "layer3"]},
    "cbl": {"layer": "layer2", "lr": 0.05, "batch_size": 50, "max_steps": 120, "eval_every": 10, "patience": 4},
    "sparse": {  # average pooling: the class map's grid mean is then exactly the logit minus the bias (tested)
        "pooling": "avg", "n_lambdas": 12, "lambda_min_ratio": 0.01, "target_nonzeros_per_class": 2,
        "max_epochs": 300, "tol": 1e-4, "batch_size": 32,
    },
    "explain": {"n_images": 3, "top_k": 2, "gallery_concepts": 2, "gallery_images": 3},
}


def write_store(
    path: Path, arrays: dict[str, np.ndarray], rows_per_shard: int, attributes: dict | None = None, fingerprint: str = "test"
) -> None:
    specs = [ArraySpec(k, v.shape, str(v.dtype), tuple(f"d{i}" for i in range(v.ndim))) for k, v in arrays.items()]
    writer = ShardedWriter(path, specs, rows_per_shard, attributes or {}, fingerprint=fingerprint)
    for shard in writer.pending():
        writer.write(shard, {k: v[writer.rows(shard)] for k, v in arrays.items()})
    writer.finalize()


def make_world(base: Path) -> Layout:
    """Write the stores of the synthetic world under base/data/syn (and base/metrics)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)
    save_backbone(base / "cnn.pt", build_toy("cnn", 3), "toy:cnn", 3, toy_preprocess("cnn", SIZE))
    backbone = load_backbone("toy:cnn", base / "cnn.pt")  # the fp16 round trip the stages see
    with torch.no_grad():
        layers = extract_layers(backbone.model, backbone.preprocess(images), ["layer2", "layer3"])
    features = layers["layer2"].half()  # (N, 64, 4, 4), the bottleneck's input (cbl.layer)
    mixing = torch.randn(4, features.shape[1], 1, 1, generator=g)
    registration = Registration((SIZE, SIZE), GRID, CLIP_VIEW, backbone.preprocess)
    signal = F.conv2d(registration.sample(features), mixing)
    signal = (signal - signal.mean(dim=(0, 2, 3), keepdim=True)) / signal.std(dim=(0, 2, 3), keepdim=True)
    noise = torch.randn(N, 1, GRID, GRID, generator=g)
    similarity = 0.2 + 0.02 * torch.cat([signal, noise], dim=1)  # (N, 5, G, G)
    labels = signal[:, :3].mean(dim=(2, 3)).argmax(dim=1)
    logits = F.one_hot(labels, 3).float() + 0.8 * torch.randn(N, 3, generator=g)
    embed_dim = len(CONCEPTS) + 1
    # unit circle embeddings whose first M coordinates are P: their cosine with text e_m is P[m]
    circles = torch.cat([similarity.permute(0, 2, 3, 1), (1 - similarity.square().sum(dim=1)).sqrt()[..., None]], dim=-1)
    clip = clip_provenance("test-clip", embed_dim)

    layout = Layout(base / "data" / "syn", base / "metrics")
    write_store(layout.images, {"images": images.numpy(), "labels": labels.numpy()}, ROWS_PER_SHARD)
    from_images = images_provenance(open_store(layout.images).attrs)
    seen_by_backbone = {**view_provenance(backbone.preprocess.to_dict(), (SIZE, SIZE)), **from_images}
    for name, value in layers.items():
        write_store(layout.features(name), {"features": value.half().numpy()}, ROWS_PER_SHARD, seen_by_backbone)
    # the 3-output toy CNN's outputs are the 3 classes in order (the features stage records the mapping)
    write_store(layout.logits, {"logits": logits.numpy()}, ROWS_PER_SHARD, {CLASS_MAP_ATTR: ClassMap((0, 1, 2), 3, "test").to_attrs()})
    write_store(layout.similarity, {P: similarity.half().numpy()}, ROWS_PER_SHARD, from_images)
    seen_by_clip = {**clip, **view_provenance(CLIP_VIEW.to_dict(), (SIZE, SIZE)), "grid": GRID, **from_images}
    write_store(layout.circles, {CIRCLES: circles.half().numpy()}, ROWS_PER_SHARD, seen_by_clip)
    # plain-image embeddings (LF-CBM's target): the circles' mean, so global similarity follows the features too
    plain = F.normalize(circles.mean(dim=(1, 2)), dim=-1).half().numpy()
    write_store(layout.clip_images, {IMAGE_EMB: plain}, ROWS_PER_SHARD, {**clip, **from_images})
    types = dict(GT_CONCEPTS)
    concepts = [{"name": n, "type": types.get(n), "prompt": n} for n in CONCEPTS]
    text_emb = np.eye(len(CONCEPTS), embed_dim, dtype=np.float16)
    write_store(layout.concepts, {TEXT_EMB: text_emb}, len(CONCEPTS), {**clip, "concepts": concepts})
    split = np.array(["train"] * TRAIN + ["val"] * VAL + ["test"] * (N - TRAIN - VAL))
    manifest = pd.DataFrame({"index": np.arange(N), "source": "syn", "label": labels.numpy(), "split": split})
    manifest.to_parquet(layout.manifest)
    layout.dataset_info.write_text(json.dumps(INFO))
    return layout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Layout]:
    base = tmp_path_factory.mktemp("salf")
    layout = make_world(base)
    (base / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return base, layout


@pytest.fixture(scope="module")
def trained(world: tuple[Path, Layout]) -> tuple[Path, Layout]:
    base, _ = world
    for stage in ("cbl", "sparse"):
        result = invoke(base, stage)
        assert result.exit_code == 0, result.output
    return world


# ------------------------------------------------------------------------------------- inputs
def test_on_the_fly_target_equals_the_materialised_one(world, tmp_path):
    base, layout = world
    concepts = read_concepts(layout.concepts)
    stored = similarity_target(layout, concepts)
    assert stored.text_emb is None and stored.n_concepts == 5 and stored.grid == GRID
    # a similarity store without P (similarity.materialize: false): P from circles x text embeddings
    bare = Layout(tmp_path / "syn")
    shutil.copytree(layout.circles, bare.circles)
    zarr.open_group(bare.similarity, mode="w", attributes={"complete": True})
    fly = similarity_target(bare, concepts)
    assert fly.text_emb is not None and fly.n_concepts == 5 and fly.grid == GRID
    features = open_store(layout.features("layer2"))["features"]
    sample = partial(sample_features, grid=registration_of(layout, "layer2").feature_grid())
    rows = np.arange(TRAIN)
    first, second = (list(pair_batches(features, target, rows, 40, sample)()) for target in (stored, fly))
    assert [f.shape[0] for f, _ in first] == [40, 40, 20]  # in order, remainder kept
    for (f1, p1), (f2, p2) in zip(first, second):
        assert torch.equal(f1, f2) and p1.shape == (f1.shape[0], 5, GRID, GRID)
        torch.testing.assert_close(p1, p2, atol=2e-3, rtol=0)  # two fp16 roundings of the same cosines
    shuffled = list(pair_batches(features, stored, rows, 40, sample, shuffle=True)())
    assert [f.shape[0] for f, _ in shuffled] == [40, 40]  # training drops the partial batch


def test_in_memory_pairs_equal_the_stream_sampled_at_the_grid(world):
    _, layout = world
    features = open_store(layout.features("layer2"))["features"]
    target = similarity_target(layout, read_concepts(layout.concepts))
    registration = registration_of(layout, "layer2")
    assert registration == Registration((SIZE, SIZE), GRID, CLIP_VIEW, toy_preprocess("cnn", SIZE))
    sample = partial(sample_features, grid=registration.feature_grid())
    rows = np.arange(TRAIN, TRAIN + VAL)
    streamed = list(pair_batches(features, target, rows, 8, sample)())
    cached = pair_batches(features, target, rows, 8, sample, in_memory_mb=1.0)
    start = TRAIN
    for (f1, p1), (f2, p2) in zip(streamed, cached(), strict=True):
        raw = torch.from_numpy(features[start : start + len(f1)])
        assert f1.shape == (len(raw), 64, GRID, GRID) and torch.equal(f1, registration.sample(raw))
        assert torch.equal(f1, f2) and torch.equal(p1, p2)
        start += len(f1)
    shuffled = pair_batches(features, target, rows, 8, sample, shuffle=True, seed=1, in_memory_mb=1.0)
    first, second = ([f for f, _ in shuffled()] for _ in range(2))
    assert [len(f) for f in first] == [8, 8, 8]  # 30 rows: the partial batch of 6 is dropped
    assert not torch.equal(torch.cat(first), torch.cat(second))  # a new order every pass


def test_splits_use_the_manifest_val_or_carve_it_from_train(world):
    _, layout = world
    manifest = read_manifest(layout.manifest)
    splits = salf_splits(manifest, 0.2, seed=0)
    assert not splits.val_from_train and splits.val.tolist() == list(range(TRAIN, TRAIN + VAL))
    no_val = manifest.assign(split=manifest["split"].replace("val", "train"))
    carved, again = salf_splits(no_val, 0.2, seed=1), salf_splits(no_val, 0.2, seed=1)
    assert carved.val_from_train and len(carved.val) == 26 and len(carved.train) == 104
    assert np.array_equal(carved.val, again.val) and not np.intersect1d(carved.val, carved.train).size
    assert carved.test.tolist() == splits.test.tolist()
    with pytest.raises(ValueError, match="test split is empty"):
        salf_splits(manifest.assign(split=manifest["split"].replace("test", "train")), 0.2, seed=0)


def test_glm_batches_give_standardised_rows_and_their_table_positions(world, tmp_path):
    _, layout = world
    values = np.stack([np.arange(N), 2 * np.arange(N)], axis=1).astype(np.float32)  # row r: (r, 2r)
    write_store(tmp_path / "c.zarr", {"activations": values}, ROWS_PER_SHARD)
    activations = open_store(tmp_path / "c.zarr")["activations"]
    labels = open_store(layout.images)["labels"]
    rows = np.arange(1, N, 3)
    standardiser = Standardiser(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0]))
    source = glm_batches(activations, labels, rows, standardiser, 16, shuffle=True, seed=0)
    x, y, position = (torch.cat(parts) for parts in zip(*source()))
    assert sorted(position.tolist()) == list(range(len(rows)))  # each SAGA table entry once per pass
    torch.testing.assert_close(x[:, 0], torch.from_numpy(rows[position.numpy()]).float())
    torch.testing.assert_close(x[:, 1], x[:, 0])  # standardised: 2r / 2
    assert torch.equal(y, torch.from_numpy(labels[:][rows[position.numpy()]]).long())


# ------------------------------------------------------------------------------------- stages
def test_cbl_refuses_a_batch_the_device_cannot_hold_before_any_work(world, monkeypatch):
    """cbl.batch_size against the free memory (monkeypatched to 0.25 MiB): one line naming the key,
    the need and the free memory, and no training; 1 GiB free lets the check pass."""
    from lib.methods.salf import bottleneck_stage
    from lib.methods.salf.cbl import step_bytes

    base, layout = world

    def no_training(*args, **kwargs):
        raise AssertionError("cbl trained before refusing the batch")

    monkeypatch.setattr(bottleneck_stage, "train_bottleneck", no_training)
    monkeypatch.setattr(bottleneck_stage, "available_memory", lambda device: 2**18)
    result = invoke(base, "cbl")
    assert result.exit_code == 2, result.output
    # the whole train and val splits fit cbl.in_memory_mb: they are held on the device too
    held = (TRAIN + VAL) * (64 + len(CONCEPTS)) * GRID**2 * 4
    needed = step_bytes(PARAMS["cbl"]["batch_size"], len(CONCEPTS), 64, GRID) + held
    assert "cbl.batch_size: 50" in result.output and f"needs {needed / 2**20:.1f} MiB" in result.output
    assert "cpu has 0.2 MiB free" in result.output and needed > 2**19
    monkeypatch.setattr(bottleneck_stage, "available_memory", lambda device: 2**30)
    with pytest.raises(AssertionError, match="trained before refusing"):
        bottleneck_stage.run_cbl(load_params(base / "params.yaml"), layout, torch.device("cpu"), Ranks())


def test_cbl_learns_the_concepts_and_drops_the_unrelated_one(trained):
    base, layout = trained
    report = json.loads(layout.salf_concepts.read_text())
    assert [c["name"] for c in report["kept"]] == CONCEPTS[:4]
    assert [c["name"] for c in report["dropped"]] == ["noise"] and report["dropped"][0]["cos3"] < 0.45
    assert min(c["cos3"] for c in report["kept"]) > 0.9
    train_curve = pd.read_csv(layout.salf_plot("cbl_train"))
    val_curve = pd.read_csv(layout.salf_plot("cbl_val"))
    assert list(train_curve.columns) == ["step", "train_loss"] and list(val_curve.columns) == ["step", "val_loss"]
    assert val_curve["val_loss"].iloc[-1] < val_curve["val_loss"].iloc[0]
    assert layout.salf_figure("cbl_loss").exists()


def test_sparse_metrics_recover_the_rules(trained):
    base, layout = trained
    metrics = json.loads(layout.salf_metrics.read_text())
    labels = open_store(layout.images)["labels"][TRAIN + VAL :]
    logits = open_store(layout.logits)["logits"][TRAIN + VAL :]
    assert metrics["acc_backbone"] == metrics["acc_backbone_unrestricted"]  # every output is mapped
    assert metrics["acc_backbone"] == pytest.approx(float((logits.argmax(axis=1) == labels).mean()))
    assert metrics["acc_sparse"] >= 0.9 and metrics["acc_dense"] >= 0.9
    assert metrics["nonzero_per_class"] <= 2 and metrics["n_concepts"] == 4
    assert metrics["rule_recovery"] == 1.0 and metrics["rule_recovery_per_class"] == {c: 1.0 for c in CLASSES}
    assert metrics["lambda_mode"] == "path"
    # Table 1's baselines (sparse.baselines) on the same features: the pooled store is the layer's mean
    pooled = open_store(layout.salf_pooled)["pooled"][:]
    features = open_store(layout.features("layer2"))["features"][:].astype(np.float32)
    np.testing.assert_allclose(pooled, features.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    assert 0 <= metrics["acc_backbone_sparse"] <= 1 and metrics["nonzero_per_class_backbone_sparse"] <= 2
    # LF-CBM's global target (the images' mean circle embedding here) drops the unrelated "noise" concept too
    assert metrics["n_concepts_lfcbm"] == 4 and min(metrics["acc_lfcbm_sparse"], metrics["acc_lfcbm_dense"]) > 0.5
    path = pd.read_csv(layout.salf_plot("path"))
    assert {"lambda", "nonzeros_per_class", "val_acc"} <= set(path.columns) and path["lambda"].is_monotonic_decreasing
    assert open_store(layout.salf_activations)["activations"].shape == (N, 4)


def test_saved_model_reproduces_the_activation_store(trained):
    base, layout = trained
    model = SalfModel.load(layout, "cpu")
    features = torch.from_numpy(open_store(layout.features("layer2"))["features"][:20])
    pooled = pool_concepts(model.concept_maps(features), model.classifier.pooling)
    torch.testing.assert_close(pooled, torch.from_numpy(open_store(layout.salf_activations)["activations"][:20]))
    assert model.layer == "layer2" and model.classifier.concept_names == tuple(CONCEPTS[:4])
    assert model.lambda_path[model.selected]["nonzeros_per_class"] <= 2


def test_new_features_rebuild_the_activation_store(trained, tmp_path):
    """The c* store persists across DVC runs: new features under the same bottleneck must not reuse it."""
    base, _ = trained
    shutil.copytree(base, tmp_path / "copy")
    layout = Layout(tmp_path / "copy" / "data" / "syn", tmp_path / "copy" / "metrics")
    before = open_store(layout.salf_activations)["activations"][:]
    features = open_store(layout.features("layer2"))["features"][:]
    shutil.rmtree(layout.features("layer2"))
    write_store(layout.features("layer2"), {"features": features[::-1].copy()}, ROWS_PER_SHARD, fingerprint="reversed")
    result = invoke(tmp_path / "copy", "sparse")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(open_store(layout.salf_activations)["activations"][:], before[::-1], rtol=1e-5, atol=1e-6)


def test_salf_stats_store_and_the_stats_stage(trained):
    """salf-stats writes, per test image, standardised c* as presence, W[l, m]·c*[m] (summing to the
    sparse logit minus its bias) and both predictions; stats reduces it to SALF-CBM's test accuracy."""
    base, layout = trained
    for stage in ("salf-stats", "stats"):
        result = invoke(base, stage)
        assert result.exit_code == 0, result.output
    group = open_store(layout.concept_stats("salf"))
    classifier = SalfModel.load(layout, "cpu").classifier
    test = np.arange(TRAIN + VAL, N)
    presence = classifier.standardiser(torch.from_numpy(open_store(layout.salf_activations)["activations"][test]))
    logits = presence @ classifier.weight.T + classifier.bias
    pred = logits.argmax(dim=1)
    torch.testing.assert_close(torch.from_numpy(group[PRESENCE][:]), presence)
    contribution = torch.from_numpy(group[CONTRIBUTION][:])
    torch.testing.assert_close(contribution.sum(dim=1), logits.gather(1, pred[:, None])[:, 0] - classifier.bias[pred])
    np.testing.assert_array_equal(group[PRED_MODEL][:], pred.numpy())
    np.testing.assert_array_equal(group[PRED_BACKBONE][:], open_store(layout.logits)["logits"][test].argmax(axis=1))
    np.testing.assert_array_equal(group[STATS_IMAGE][:], test)
    np.testing.assert_array_equal(group[STATS_LABEL][:], open_store(layout.images)["labels"][test])
    assert group.attrs["concepts"] == CONCEPTS[:4] and group.attrs["split"] == "test"
    stats = json.loads(layout.stats_metrics.read_text())["salf"]
    salf = json.loads(layout.salf_metrics.read_text())
    assert stats["acc_model"] == pytest.approx(salf["acc_sparse"]) and stats["acc_backbone"] == pytest.approx(salf["acc_backbone"])
    assert stats["l0"] == pytest.approx(float((classifier.weight[pred] != 0).sum(dim=1).float().mean()))
    assert stats["n_images"] == N - TRAIN - VAL and stats["n_concepts"] == 4


def test_explain_stage_writes_png_and_json_per_image_and_a_gallery(trained):
    base, layout = trained
    result = invoke(base, "explain")
    assert result.exit_code == 0, result.output
    records = sorted(layout.explain.glob("row*.json"))
    assert len(records) == 3 and len(list(layout.explain.glob("row*.png"))) == 3
    assert (layout.explain / "gallery.png").exists()
    model = SalfModel.load(layout, "cpu")
    features = open_store(layout.features("layer2"))["features"]
    for path in records:
        record = json.loads(path.read_text())
        row = int(path.stem.removeprefix("row"))
        assert TRAIN + VAL <= row < N and 1 <= len(record["concepts"]) <= 2  # top_k = 2, zeros left out
        assert all(c["contribution"] != 0 for c in record["concepts"])
        _, logits = model.classifier.classify(model.concept_maps(torch.from_numpy(features[row : row + 1])))
        assert record["predicted"] == record["class"] == int(logits.argmax())
        assert record["logit"] == pytest.approx(float(logits[0, record["class"]]), abs=1e-5)


def test_explain_adhoc_rows_and_files(trained):
    base, layout = trained
    image = open_store(layout.images)["images"][140]
    Image.fromarray(image).save(base / "picture.png")
    result = invoke(base, "explain", "--index", "140", "--image", "picture.png", "--class", "2")
    assert result.exit_code == 0, result.output
    from_row = json.loads((layout.explain_adhoc / "row140.json").read_text())
    from_file = json.loads((layout.explain_adhoc / "file0_picture.json").read_text())
    assert from_row["class"] == 2 and (layout.explain_adhoc / "file0_picture.png").exists()
    assert from_file["logit"] == pytest.approx(from_row["logit"], abs=1e-5)


def test_probe_and_intervene_print_json(trained):
    base, layout = trained
    result = invoke(base, "probe", "--index", "150", "--box", "0,0,8,8", "-k", "3")
    assert result.exit_code == 0, result.output
    probed = json.loads(result.stdout)
    assert probed["roi_pixels"] == 64 and len(probed["concepts"]) == 3

    result = invoke(
        base, "intervene", "--index", "150", "--box", "0,0,16,16", "--concept", "sand", "--beta", "20", "--class", "2"
    )
    assert result.exit_code == 0, result.output
    edited = json.loads(result.stdout)
    assert edited["cells"] == GRID * GRID and edited["new_class_name"] == "sand_scene"
    assert edited["target_logit_change"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["probe", "--index", "150", "--box", "0,0,20,8"], "is empty or outside the 16x16 image"),
        (["probe", "--index", "150", "--box", "0,0,8"], "--box must be four integers"),
        (["probe", "--index", "150"], "give exactly one ROI"),
        (["probe", "--box", "0,0,8,8"], "give exactly one image"),
        (["probe", "--index", "999", "--box", "0,0,8,8"], "out of range; the store has rows 0..159"),
        (["intervene", "--index", "150", "--box", "0,0,8,8", "--concept", "red", "--beta", "1"], "unknown concept 'red'"),
        (
            ["intervene", "--index", "150", "--box", "0,0,8,8", "--concept", "sand", "--beta", "1", "--class", "3"],
            "class index 3 out of range",
        ),
        (["explain", "--index", "150", "--class", "7"], r"class index 7 out of range"),
        (["intervene", "--index", "150", "--mask", "absent.png", "--concept", "sand", "--beta", "1"], "ROI mask not found"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(trained, args, message):
    base, _ = trained
    result = invoke(base, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_mask_roi_equals_the_box(trained):
    base, _ = trained
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[0:8, 4:12] = 255
    Image.fromarray(mask).save(base / "roi.png")
    by_mask = invoke(base, "probe", "--index", "150", "--mask", "roi.png")
    by_box = invoke(base, "probe", "--index", "150", "--box", "4,0,12,8")
    assert by_mask.exit_code == 0, by_mask.output
    assert json.loads(by_mask.stdout) == json.loads(by_box.stdout)


# ------------------------------------------------------------------------------------- evaluate
def test_evaluate_method_maps_and_class_map(trained):
    base, layout = trained
    config = load_params(base / "params.yaml")
    truth = GroundTruth.from_info(INFO)
    method = METHODS["salf"](EvalContext(config, layout, torch.device("cpu"), truth))
    assert isinstance(method, SalfMaps)
    rows = torch.arange(130, 140)
    images = open_store(layout.images)
    batch = EvalBatch(rows, torch.from_numpy(images["images"][130:140]), torch.from_numpy(images["labels"][130:140]))
    maps = method.concept_maps(batch)
    assert maps.concepts.tolist() == [0, 1, 2, 3]  # blue, star, sand, water; no "grass" channel in the model
    model = method.model
    features = torch.from_numpy(open_store(layout.features("layer2"))["features"][130:140])
    raw = model.concept_maps(features)
    # drawn on the 16 px image with each cell at its circle centre (6, 12, 18 of CLIP's 24 px: 3.8, 7.8, 11.8)
    geometry = model.registration
    assert maps.maps.shape == (10, 4, SIZE, SIZE) and geometry == registration_of(layout, "layer2")
    torch.testing.assert_close(maps.maps, geometry.upsample(model.classifier.standardised_maps(raw)))
    class_maps = method.class_maps(batch)
    _, logits = model.classifier.classify(raw)
    predicted = logits.argmax(dim=1)
    # the predicted class's weighted sum of standardised maps, scene ("background") concepts left out
    objects = torch.tensor([kind != "background" for kind in model.concept_types], dtype=torch.float32)
    weights = model.classifier.weight[predicted]
    expected = torch.einsum("bm,bmgh->bgh", weights * objects, model.classifier.standardised_maps(raw))
    torch.testing.assert_close(class_maps, geometry.upsample(expected))
    # with average pooling and no scene weight the class map spreads logit - bias over the grid
    no_scene = (weights * (1 - objects)).abs().sum(dim=1) == 0
    chosen_logit = logits.gather(1, predicted[:, None])[:, 0]
    assert no_scene.any() and not no_scene.all()
    spread = chosen_logit - model.classifier.bias[predicted]
    torch.testing.assert_close(expected.mean(dim=(1, 2))[no_scene], spread[no_scene])
    # contributions W[l, m]·c*[m] of the scored concepts; with every concept scored they would sum to logit - bias
    given = method.concept_contributions(batch)
    activations, _ = model.classifier.classify(raw)
    assert given.concepts.tolist() == maps.concepts.tolist()
    full = weights * activations
    torch.testing.assert_close(given.values, full[:, method.columns])
    torch.testing.assert_close(full.sum(dim=1), chosen_logit - model.classifier.bias[predicted])
    assert method.accuracy_path() == [(r["nonzeros_per_class"], r["val_acc"]) for r in model.lambda_path]


def test_evaluate_method_is_skipped_before_training(world, tmp_path):
    config = load_params(world[0] / "params.yaml")
    context = EvalContext(config, Layout(tmp_path / "none"), torch.device("cpu"), GroundTruth.from_info(INFO))
    assert METHODS["salf"](context) is None


def test_stores_of_other_images_are_refused_before_training(world, tmp_path):
    """cbl pairs rows of the features, circles and similarity stores: run by hand after the images
    changed (prepare re-run, the rest not), it must stop with the fix instead of training on mismatched rows."""
    base, _ = world
    shutil.copytree(base, tmp_path / "copy")
    layout = Layout(tmp_path / "copy" / "data" / "syn", tmp_path / "copy" / "metrics")
    stored = open_store(layout.images)
    images, labels = stored["images"][:], stored["labels"][:]
    shutil.rmtree(layout.images)
    write_store(layout.images, {"images": images, "labels": labels}, ROWS_PER_SHARD, fingerprint="re-prepared")
    shutil.rmtree(layout.salf, ignore_errors=True)  # a trained model, when an earlier test made one
    result = invoke(tmp_path / "copy", "cbl")
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "the images, circles, features stores were made from different images" in message
    assert "re-run the stages after prepare on the current images (dvc repro)" in message
    assert not layout.salf_bottleneck.exists()


def test_missing_inputs_and_bad_layer_are_clear_errors(world, tmp_path):
    base, _ = world
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "data": {**PARAMS["data"], "name": "absent"}}))
    result = invoke(tmp_path, "cbl")
    assert result.exit_code == 2 and "manifest not found" in result.output
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "cbl": {"layer": "layer9"}}))
    result = invoke(tmp_path, "cbl")
    assert result.exit_code == 2
    expected = "cbl.layer 'layer9' is not extracted; it must be one of features.layers ['layer2', 'layer3']"
    assert expected in " ".join(result.output.split())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "data": {**PARAMS["data"], "name": "absent"}}))
    result = invoke(tmp_path, "explain")
    assert result.exit_code == 2 and "run the cbl stage first" in " ".join(result.output.split())
