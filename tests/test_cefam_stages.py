"""CE-FAM's stages end to end on a tiny toy project (random CLIP and backbone): translator, regions,
their stores and checks, evaluate's cefam adapters, and the one-line errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core.layout import Layout
from lib.core.params import load_params
from lib.core.schema import CONTRIBUTION, IMAGE_NORM, PRED_BACKBONE, PRED_MODEL, PRESENCE, STATS_IMAGE, STATS_LABEL
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.data.manifest import read_dataset_info, read_manifest, split_indices
from lib.evaluate.adapters import METHODS
from lib.evaluate.registry import EvalBatch, EvalContext
from lib.evaluate.truth import GroundTruth
from lib.methods.cefam.artifacts import REGION_ASSOCIATION, REGION_IMAGE, REGION_PRESENCE, TrainedTranslator, map_array
from lib.methods.cefam.regions import pool_features
from lib.methods.cefam.taps import tapped_forward
from lib.models.backbones import load_backbone
from lib.models.weights import save_backbone
from lib.pipeline.stored_concepts import read_concepts
from lib.toy.models.cnn import build_toy, toy_preprocess
from tests.stage_cli import invoke, merge_params

LAYERS = ["layer1", "layer2", "layer3"]
SETTINGS = {
    "backbone": {"arch": "toy:cnn", "weights": "models/toy/cnn.pt"},
    "features": {"layers": LAYERS, "batch_size": 16},
    "cefam": {
        "layers": LAYERS,
        "translator": {"optimizer": "adam", "lr": 0.01, "max_epochs": 4, "batch_size": 8},
        "regions": {"batch_size": 3, "chunk": 4, "top_k": 6, "contribution_concepts": 2, "n_figures": 2, "figure_concepts": 2,
                    "figure_details": 1},
    },
}


@pytest.fixture(scope="module")
def project(toy_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`toy_inputs` with a random toy CNN, after clip-images, concepts, features, translator and regions."""
    root = tmp_path_factory.mktemp("cefam") / "project"
    shutil.copytree(toy_inputs, root)
    torch.manual_seed(0)
    save_backbone(root / "models/toy/cnn.pt", build_toy("cnn", 8), "toy:cnn", 8, toy_preprocess("cnn", 64))
    merge_params(root, **SETTINGS)
    for stage in ("clip-images", "concepts", "features", "translator", "regions"):
        result = invoke(root, stage)
        assert result.exit_code == 0, f"{stage}: {result.output}"
    return root


def _layout(root: Path) -> Layout:
    config = load_params(root / "params.yaml")
    return Layout.from_params(config, base=root / "data")


def test_translator_records_what_it_was_trained_on(project: Path):
    layout = _layout(project)
    trained = TrainedTranslator.load(layout.cefam_translator)
    assert trained.layers == tuple(LAYERS) and trained.channels == (32, 64, 128) and trained.lam == 1e-3
    assert trained.concepts == read_concepts(layout.concepts).names
    assert trained.backbone_id == open_store(layout.features("layer1")).attrs["model_id"]
    assert trained.model.in_dim == 224 and trained.model.hidden == (256, 128)  # default_hidden(224, 128)
    assert open_store(layout.cefam_pooled)["z_cat"].shape == (40, 224)
    metrics = json.loads((project / "metrics/cefam.json").read_text())
    assert {"translator_cos", "concept_agreement", "concept_corr", "best_epoch"} <= set(metrics)
    assert -1 <= metrics["translator_cos"] <= 1 and 0 <= metrics["concept_agreement"] <= 1
    curve = (project / "metrics/plots/cefam_translator.csv").read_text().splitlines()
    assert curve[0] == "epoch,train_loss,val_loss,lr" and len(curve) == 1 + metrics["epochs"]
    assert not list((layout.root / ".partial").rglob("*.pt"))  # the training checkpoint is gone once published


def test_translator_trains_on_fresh_crops_with_raw_targets(project: Path, tmp_path: Path):
    root = _copy(project, tmp_path)
    translator = {**SETTINGS["cefam"]["translator"], "augment": True, "crop_scale": [0.3, 1.0], "max_epochs": 2}
    merge_params(root, cefam={**SETTINGS["cefam"], "translator": translator})
    result = invoke(root, "translator")
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics/cefam.json").read_text())
    assert metrics["epochs"] == 2 and -1 <= metrics["translator_cos"] <= 1
    # the other backbone than the features' is refused before training on its crops
    torch.manual_seed(1)
    save_backbone(root / "models/toy/other.pt", build_toy("cnn", 8), "toy:cnn", 8, toy_preprocess("cnn", 64))
    merge_params(root, backbone={"weights": "models/toy/other.pt"})
    _one_line_error(invoke(root, "translator"), "backbone:", "the stored features were made by")


def test_raw_targets_need_a_store_with_the_norms(project: Path, tmp_path: Path):
    root = _copy(project, tmp_path)
    shutil.rmtree(_layout(root).clip_images / IMAGE_NORM)
    _one_line_error(invoke(root, "translator"), "cefam.translator.targets: 'raw'", "no raw embedding norms")
    merge_params(root, cefam={**SETTINGS["cefam"], "translator": {**SETTINGS["cefam"]["translator"], "targets": "normalized"}})
    result = invoke(root, "translator")
    assert result.exit_code == 0, result.output


def test_regions_stores_hold_every_test_image(project: Path):
    layout = _layout(project)
    rows = split_indices(read_manifest(layout.manifest), "test")
    regions, stats = open_store(layout.cefam_regions), open_store(layout.concept_stats("cefam"))
    m = len(read_concepts(layout.concepts).names)
    assert regions[REGION_IMAGE][:].tolist() == rows.tolist() == stats[STATS_IMAGE][:].tolist()
    assert regions[REGION_ASSOCIATION].shape == (8, m, 3) and regions.attrs["layers"] == LAYERS
    assert [regions[map_array(layer)].shape[2:] for layer in LAYERS] == [(32, 32), (16, 16), (8, 8)]
    assert all((regions[map_array(layer)][:] >= 0).all() for layer in LAYERS)  # ReLU'd
    assert stats.attrs["method"] == "cefam" and stats.attrs["concepts"] == regions.attrs["concepts"]

    # the stores agree with the models: S^t from the translator, predictions from the backbone
    trained = TrainedTranslator.load(layout.cefam_translator)
    backbone = load_backbone("toy:cnn", project / "models/toy/cnn.pt")
    images = torch.from_numpy(read_rows(open_store(layout.images)["images"], rows))
    with torch.no_grad():
        logits, maps = tapped_forward(backbone.model, backbone.preprocess(images), LAYERS)
        z, _ = pool_features(maps)
        presence = trained.model.scores(torch.cat(z, dim=1), read_concepts(layout.concepts).text_emb)
    np.testing.assert_allclose(regions[REGION_PRESENCE][:], presence.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(stats[PRESENCE][:], regions[REGION_PRESENCE][:])
    assert stats[PRED_BACKBONE][:].tolist() == stats[PRED_MODEL][:].tolist() == logits.argmax(1).tolist()
    assert stats[STATS_LABEL][:].tolist() == read_rows(open_store(layout.images)["labels"], rows).tolist()
    contribution = stats[CONTRIBUTION][:]
    assert ((contribution != 0).sum(axis=1) <= 2).all() and (contribution != 0).any()
    top = np.argsort(-stats[PRESENCE][:], axis=1)[:, :2]
    assert all(set(np.flatnonzero(c)) <= set(t) for c, t in zip(contribution, top))  # only the top-2 concepts by S^t

    explained = sorted(p.name for p in layout.cefam_explain.glob("row*.png"))
    stems = sorted({name.split("_")[0].removesuffix(".png") for name in explained})
    assert len(stems) == 2  # n_figures images, each with its explanation; figure_details of them with layer maps and curves
    detailed = [stem for stem in stems if f"{stem}_layers.png" in explained]
    assert len(detailed) == 1 and f"{detailed[0]}_masking.png" in explained
    assert set(explained) <= {f"{stem}{suffix}.png" for stem in stems for suffix in ("", "_layers", "_masking", "_iou")}
    share = json.loads((project / "metrics/cefam_regions.json").read_text())["top1_layer_share"]
    assert set(share) == set(LAYERS) and sum(share.values()) == pytest.approx(1.0, abs=1e-5)  # 6 digits each


def test_evaluate_scores_the_top1_and_best_of_candidates_maps(project: Path):
    layout = _layout(project)
    config = load_params(project / "params.yaml")
    truth = GroundTruth.from_info(read_dataset_info(layout.dataset_info))
    context = EvalContext(config, layout, torch.device("cpu"), truth)
    top1, best4 = METHODS["cefam"](context), METHODS["cefam_best4"](context)
    assert top1.name == "cefam" and best4.name == "cefam_best4"
    rows = split_indices(read_manifest(layout.manifest), "test")[:4]
    store = open_store(layout.images)
    batch = EvalBatch(torch.from_numpy(rows), torch.from_numpy(read_rows(store["images"], rows)), torch.from_numpy(rows * 0))
    one, four = top1.concept_maps(batch), best4.concept_maps(batch)
    m = len(one.concepts)
    assert m > 0 and one.maps.shape == (4, m, 64, 64) and four.maps.shape == (4, m, 3, 64, 64)  # 3 layers, so 3 candidates
    torch.testing.assert_close(four.maps[:, :, 0], one.maps)  # the best association score comes first
    # the Top-1 map is the upsampled map of the layer with the highest association score
    regions = open_store(layout.cefam_regions)
    names = regions.attrs["concepts"]
    column = names.index(truth.concept_names[int(one.concepts[0])])
    best = int(regions[REGION_ASSOCIATION][0, column].argmax())
    raw = torch.from_numpy(regions[map_array(LAYERS[best])][0, column].astype(np.float32))
    expected = torch.nn.functional.interpolate(raw[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(one.maps[0, 0], expected)
    with pytest.raises(ValueError, match="no row for images"):
        top1.concept_maps(EvalBatch(torch.tensor([0]), batch.images[:1], batch.labels[:1]))  # a train image


def _copy(project: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(project, root)
    return root


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output and all(n in text for n in needles), result.output


def test_clear_errors_for_layers(project: Path, tmp_path: Path):
    root = _copy(project, tmp_path)
    # regions asked for a layer the translator was not trained on (one the backbone has)
    merge_params(root, cefam={**SETTINGS["cefam"], "regions": {**SETTINGS["cefam"]["regions"], "layers": ["conv1"]}})
    _one_line_error(invoke(root, "regions"), "cefam.regions.layers: ['conv1']", "the translator was trained on layers")
    # a layer the backbone does not have
    merge_params(root, features={"layers": [*LAYERS, "layer9"]}, cefam={**SETTINGS["cefam"], "layers": [*LAYERS, "layer9"]})
    _one_line_error(invoke(root, "translator"), "cefam.layers: 'layer9'", "not found")
    # a layer the features stage does not extract
    merge_params(root, features={"layers": LAYERS})
    _one_line_error(invoke(root, "translator"), "cefam.layers ['layer9'] are not extracted")


def test_clear_errors_for_changed_inputs(project: Path, tmp_path: Path):
    root = _copy(project, tmp_path)
    # another backbone than the translator's
    torch.manual_seed(1)
    save_backbone(root / "models/toy/other.pt", build_toy("cnn", 8), "toy:cnn", 8, toy_preprocess("cnn", 64))
    merge_params(root, backbone={"weights": "models/toy/other.pt"})
    _one_line_error(invoke(root, "regions"), "backbone:", "the translator was trained on features of")
    merge_params(root, backbone=SETTINGS["backbone"])
    # the concept list changed since training
    concepts = root / "concepts/toy.txt"
    concepts.write_text(concepts.read_text().replace("striped\tpattern\n", ""))
    assert invoke(root, "concepts").exit_code == 0
    _one_line_error(invoke(root, "regions"), "concepts.file", "concept list changed", "removed ['striped']", "lam: 0")
    # a concept-free translator (lam 0) explains any list
    merge_params(root, cefam={**SETTINGS["cefam"], "translator": {**SETTINGS["cefam"]["translator"], "lam": 0.0}})
    assert invoke(root, "translator").exit_code == 0
    result = invoke(root, "regions")
    assert result.exit_code == 0, result.output


def test_regions_on_two_torchrun_ranks_write_the_one_process_stores(project: Path, tmp_path: Path, torchrun):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    merge_params(root, data={"rows_per_shard": 4})  # the 8 test images in 2 shards: one per rank
    layout = _layout(root)
    stores = [layout.cefam_regions, layout.concept_stats("cefam")]
    for path in stores:
        shutil.rmtree(path)
    assert invoke(root, "regions").exit_code == 0
    one_process = [{str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} for path in stores]
    for path in stores:
        shutil.rmtree(path)
    result = torchrun("-m", "stages", "regions", "--params", "params.yaml", cwd=root)
    assert result.stderr.count("1 shards written") == 2
    assert [{str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} for path in stores] == one_process
