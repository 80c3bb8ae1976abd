"""The evaluate stage: ground truth, score accumulation, the method registry, outputs and the CLI."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr
from typer.testing import CliRunner

from lib.core.layout import Layout
from lib.core.params import DataParams, EvaluateParams, Params, ToyWorldParams
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.data.manifest import read_dataset_info, read_manifest, split_indices
from lib.evaluate.adapters import METHODS
from lib.evaluate.adapters.baselines import CamBaseline, CentrePrior, RandomMaps
from lib.evaluate.registry import ConceptMapMethod, ConceptMaps, EvalBatch, EvalContext, build_methods
from lib.evaluate.report import summary_table, write_evaluation
from lib.evaluate.run import CEFAM_LOWER, CHANCE, IDEAL, evaluate_methods
from lib.evaluate.scoring import ConceptMapScores, SegmentationScores, resize_maps
from lib.evaluate.truth import GroundTruth
from lib.metrics.spatial import cefam_fractions
from lib.models.classes import ClassMap
from lib.models.weights import save_backbone
from lib.toy import world as toy_world
from lib.toy.models.cnn import build_toy, toy_preprocess
from stages.__main__ import app

TOY_INFO = {
    "kind": "toy",
    "classes": [c.name for c in toy_world.CLASSES],
    "concepts": [{"name": c.name, "type": c.type} for c in toy_world.CONCEPTS],
    "rules": toy_world.rules_table().to_dict(orient="records"),
}
TOY_DATA = DataParams(name="micro", image_size=32, rows_per_shard=16, toy=ToyWorldParams(n_train=8, n_val=8, n_test=24))


@pytest.fixture(scope="module")
def toy_layout(prepared_toy) -> Layout:
    return prepared_toy(TOY_DATA)


# ---------------------------------------------------------------------------------- ground truth
def test_class_masks_are_the_pixels_of_the_objects_satisfying_the_rule():
    world = toy_world.generate(40, seed=3, image_size=32)
    truth = GroundTruth.from_info(TOY_INFO)
    targets = truth.class_masks(torch.from_numpy(world.concept_masks), torch.from_numpy(world.labels)).numpy()
    for i, label in enumerate(world.labels):  # reference: object slots whose attributes contain the rule's
        rule = toy_world.CLASSES[label].object_attributes
        wanted = {toy_world.concept_index(name) for name in rule}
        slots = [j for j, attributes in enumerate(world.objects[i]) if wanted <= set(attributes.tolist())]
        expected = np.isin(world.object_map[i], slots)
        assert expected.any() and np.array_equal(targets[i], expected)


def test_class_without_object_rule_has_no_target_and_background_never_counts():
    info = {
        "classes": ["scene", "thing"],
        "concepts": [{"name": "sky", "type": "background"}, {"name": "ball", "type": "object"}],
        "rules": [
            {"class_id": 0, "concept_id": 0, "concept_type": "background"},
            {"class_id": 1, "concept_id": 0, "concept_type": "background"},
            {"class_id": 1, "concept_id": 1, "concept_type": "object"},
        ],
    }
    truth = GroundTruth.from_info(info)
    masks = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    masks[:, 0, 0] = True  # sky: top row
    masks[:, 1, 1, 1] = True  # ball: one pixel
    targets = truth.class_masks(masks, torch.tensor([0, 1]))
    assert not targets[0].any()
    assert targets[1].tolist() == [[False, False], [False, True]]


def test_concept_ids_match_names_and_ground_truth_needs_concepts():
    truth = GroundTruth.from_info(TOY_INFO)
    columns, ids = truth.concept_ids(["red", "star", "night", "a dog"])
    assert columns.tolist() == [1, 2] and ids.tolist() == [toy_world.concept_index("star"), toy_world.concept_index("night")]
    with pytest.raises(ValueError, match="lists no concepts"):
        GroundTruth.from_info({"kind": "imagefolder", "classes": ["a"], "concepts": [], "rules": []})


# -------------------------------------------------------------------------------------- scoring
def _two_images() -> torch.Tensor:
    """Masks (2, 3, 8, 8): concept 0 top-left 4x4 square in both images, concept 1 only in image 0,
    concept 2 nowhere."""
    masks = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    masks[:, 0, :4, :4] = True
    masks[0, 1, 4:, 2:6] = True
    return masks


def test_concept_scores_of_perfect_and_constant_maps():
    masks = _two_images()
    fractions = torch.linspace(0, 1, 65, dtype=torch.float64)
    perfect = ConceptMapScores(["a", "b", "b"], fractions, 0.5)
    perfect.add(masks.float(), torch.arange(3), masks)
    assert perfect.n_pairs == 3  # (0, 0), (0, 1), (1, 0): absent concepts are not scored
    ones = {"nra": 1.0, "nra_chance": 1.0, "epg": 1.0, "hit": 1.0, "coverage": 1.0}
    assert {kind: {key: v[key] for key in ones} for kind, v in perfect.summary().items()} == {"avg": ones, "a": ones, "b": ones}
    # the authors' bookkeeping: EPG 1 and a hit, their NRA not quite 1 (their ideal curve lags a pixel): 1.011 here
    authors = perfect.summary()["avg"]
    assert authors["epg_authors"] == 1.0 and authors["hit_authors"] == 1.0
    assert authors["nra_authors"] == pytest.approx(1.0113324, abs=1e-6)
    torch.testing.assert_close(perfect.curve.mean()[16], torch.tensor(1.0, dtype=torch.float64))  # top 25 % = the 16-px masks

    constant = ConceptMapScores(["a", "b", "b"], fractions, 0.5)
    constant.add(torch.ones(2, 3, 8, 8), torch.arange(3), masks)
    summary = constant.summary()
    # a constant map selects at random: the chance curve a·n / (n + a - a·n), a = 16/64. NRA (chance) is 0 by
    # construction; CE-FAM's lower curve a·n (area a/2) lies below chance, so its NRA is the chance curve's
    # normalised area, about 0.17 here (it was 0 under the old definition). EPG: min-max rescaling leaves
    # nothing to point with, so 0 (was 16/64, the raw energy share).
    a, n = 0.25, fractions
    chance = torch.trapezoid(a * n / (n + a - a * n), n).item()
    ideal = torch.trapezoid(torch.minimum(n, torch.tensor(a)) / torch.maximum(n, torch.tensor(a)), n).item()
    expected = (chance - a / 2) / (ideal - a / 2)
    assert 0.15 < expected < 0.2
    for kind in ("a", "b"):
        assert summary[kind]["nra"] == pytest.approx(expected, abs=1e-12)
        assert summary[kind]["nra_chance"] == pytest.approx(0.0, abs=1e-12)
        assert summary[kind]["epg"] == 0.0 and summary[kind]["hit"] == 0.0 and summary[kind]["coverage"] == 1.0


def test_hit_counts_concepts_without_maps_as_misses():
    masks = _two_images()
    scores = ConceptMapScores(["a", "b", "b"], torch.linspace(0, 1, 33, dtype=torch.float64), 0.5)
    # a 4x4 map of concept 1 only: bilinear upsampling keeps every mask pixel above every other
    low = masks[:, 1:2].float().reshape(2, 1, 4, 2, 4, 2).amax(dim=(3, 5))
    scores.add(low, torch.tensor([1]), masks)
    assert scores.n_pairs == 1  # of the 3 ground-truth pairs, one has a map
    summary = scores.summary()
    # CE-FAM's Hit rate is over every ground-truth pair: concept 0 (type a, present in both images) has
    # no map, so type a scores Hit 0 and coverage 0 with NRA/EPG undefined, and the average over the
    # types halves Hit (it was {"avg", "b"} only, Hit 1.0, before)
    assert set(summary) == {"avg", "a", "b"}
    assert summary["a"]["hit"] == 0.0 and summary["a"]["coverage"] == 0.0 and math.isnan(summary["a"]["nra"])
    assert math.isnan(summary["a"]["epg"]) and math.isnan(summary["a"]["nra_chance"])
    assert summary["b"]["nra"] == pytest.approx(1.0) and summary["b"]["hit"] == 1.0 and summary["b"]["coverage"] == 1.0
    assert 0.5 < summary["b"]["epg"] < 1.0  # the blurred edge puts some energy outside
    assert summary["avg"]["nra"] == pytest.approx(1.0) and summary["avg"]["hit"] == 0.5 and summary["avg"]["coverage"] == 0.5


def test_all_metrics_average_over_the_same_rows():
    # image 0: concept 0 covers the whole image (NRA undefined: no row for any metric); concept 1 a 2x2 mask
    # with an all-zero map (EPG 0 and kept: it was NaN and dropped while its NRA row stayed)
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    masks[0, 0] = True
    masks[0, 1, :2, :2] = True
    scores = ConceptMapScores(["a", "b"], torch.linspace(0, 1, 17, dtype=torch.float64), 0.5)
    scores.add(torch.zeros(1, 2, 4, 4), torch.arange(2), masks)
    summary = scores.summary()
    assert set(summary) == {"avg", "b"}  # the whole-image mask is no row
    assert summary["b"]["epg"] == 0.0 and summary["b"]["nra_chance"] == pytest.approx(0.0, abs=1e-12)
    assert summary["b"]["hit"] == 0.0 and summary["avg"] == summary["b"]


def test_candidate_maps_are_scored_by_the_best_one():
    masks = _two_images()
    fractions = torch.linspace(0, 1, 65, dtype=torch.float64)
    good, bad = masks.float(), (~masks).float()
    # concept 0: the good map is the second candidate in image 0 and the first in image 1
    candidates = torch.stack([bad, good], dim=2)
    candidates[1, 0] = torch.stack([good[1, 0], bad[1, 0]])
    scores = ConceptMapScores(["a", "b", "b"], fractions, 0.5)
    scores.add(candidates, torch.arange(3), masks)
    single = ConceptMapScores(["a", "b", "b"], fractions, 0.5)
    single.add(good, torch.arange(3), masks)
    assert scores.summary() == single.summary() and scores.summary()["avg"]["nra"] == 1.0
    torch.testing.assert_close(scores.curve.mean(), single.curve.mean())


def test_protocols_choose_their_candidates_and_report_layer_shares():
    # one 10x10 image, concept 0 = a 2x2 mask at the top left; three candidates from layers "l1".."l3"
    masks = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    masks[0, 0, :2, :2] = True
    inside, outside = masks[0, 0].float(), (~masks[0, 0]).float()
    weak = torch.zeros(10, 10)
    weak[3:] = 1.0  # 70 wrong pixels first, then the mask, then the rest: NRA 0 under both protocols, EPG > 0
    weak[:2, :2] = 0.5
    sources = torch.tensor([[[2, 0, 1]]])
    cases = {
        "mask found": (torch.stack([outside, inside, weak])[None, None], 0),
        "nothing found": (torch.stack([outside, weak, weak])[None, None], -1),
    }
    for candidates, authors_index in cases.values():
        scores = ConceptMapScores(["a"], cefam_fractions(100), 0.5)
        scores.add(candidates, torch.tensor([0]), masks, sources, ("l1", "l2", "l3"))
        avg = scores.summary()["avg"]
        assert set(avg) >= {"nra", "epg", "hit", "auc", "auc_high", "auc_low", "nra_authors", "epg_authors", "hit_authors",
                            "auc_authors", "auc_high_authors", "auc_low_authors", "layer_share_l1", "layer_share_authors_l1"}
        assert avg["auc_low"] == pytest.approx(4 / 100 / 2) and avg["auc_low_authors"] == pytest.approx(4 / 100 / 2)
        assert avg["auc"] <= avg["auc_high"]  # (the authors' AUC may pass their AUC_high: a map equal to the mask does)
        if authors_index == 0:  # both pick candidate 1 (the mask itself), from layer l1
            assert avg["hit"] == 1.0 and avg["hit_authors"] == 1.0 and avg["epg"] == avg["epg_authors"] == 1.0
            assert avg["layer_share_l1"] == 1.0 and avg["layer_share_authors_l1"] == 1.0 and avg["layer_share_l3"] == 0.0
        else:  # nothing beats 0: the authors keep EPG 0 and record no layer; the paper keeps the weak map's EPG
            assert avg["nra"] == 0.0 and avg["nra_authors"] == 0.0 and avg["epg_authors"] == 0.0
            assert avg["epg"] == pytest.approx(2 / 72)  # min-max: 70 ones outside, 4 halves inside
            assert avg["layer_share_l1"] == 1.0 and math.isnan(avg["layer_share_authors_l1"])
    only = ConceptMapScores(["a"], cefam_fractions(100), 0.5, protocols=("authors",))
    only.add(cases["mask found"][0], torch.tensor([0]), masks)
    assert set(only.summary()["avg"]) == {"nra_authors", "epg_authors", "hit_authors", "auc_authors", "auc_high_authors",
                                          "auc_low_authors", "coverage"}
    with pytest.raises(ValueError, match="protocols"):
        ConceptMapScores(["a"], cefam_fractions(100), 0.5, protocols=("both",))


def test_resize_maps_is_bilinear_and_a_no_op_at_size():
    maps = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resize_maps(maps, (8, 10)), F.interpolate(maps[:, None], (8, 10), mode="bilinear")[:, 0])
    assert resize_maps(maps, (4, 5)) is maps
    assert resize_maps(maps.half(), (4, 5)).dtype == torch.float32


def test_segmentation_scores_skip_images_without_target():
    targets = torch.zeros(3, 4, 4, dtype=torch.bool)
    targets[0, :2] = True
    targets[2, :, :1] = True
    scores = SegmentationScores()
    scores.add(targets.float(), targets)
    assert scores.n_images == 2
    assert scores.summary() == {"pixel_acc": 1.0, "miou": 1.0, "map": 1.0}


def test_bad_method_outputs_raise():
    with pytest.raises(ValueError, match=r"\(B, M', h, w\) or \(B, M', K, h, w\)"):
        ConceptMaps(torch.zeros(1, 2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one per map channel"):
        ConceptMaps(torch.zeros(1, 2, 4, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="float tensor"):
        ConceptMaps(torch.zeros(1, 2, 4, 4, dtype=torch.bool), torch.tensor([0, 1]))
    scores = ConceptMapScores(["a", "b", "b"], torch.linspace(0, 1, 5, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r"concept ids must lie in \[0, 3\)"):
        scores.add(torch.zeros(2, 1, 8, 8), torch.tensor([3]), _two_images())
    with pytest.raises(ValueError, match="class maps must have shape"):
        SegmentationScores().add(torch.zeros(1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))


# ------------------------------------------------------------------------------------- registry
def test_the_method_table_lists_baselines_and_methods():
    assert list(METHODS)[:5] == ["random", "centre", "gradcam", "gradcam++", "scorecam"]
    assert {"salf", "cefam", "cefam_best4"} <= set(METHODS)


def test_build_methods_skips_unavailable_and_checks_names(toy_layout: Layout):
    context = EvalContext(Params(), toy_layout, torch.device("cpu"), GroundTruth.from_info(TOY_INFO))
    factories = {"centre": lambda context: CentrePrior(), "later": lambda context: None}
    methods, skipped = build_methods(context, factories)
    assert [m.name for m in methods] == ["centre"] and skipped == ["later"]
    with pytest.raises(ValueError, match="registered as 'wrong' returned a method named 'centre'"):
        build_methods(context, {"wrong": lambda context: CentrePrior()})


def test_cam_factories_load_the_backbone_or_skip_missing_weights(toy_layout: Layout, tmp_path: Path):
    truth = GroundTruth.from_info(TOY_INFO)
    absent = Params.model_validate({"backbone": {"weights": str(tmp_path / "absent.pt")}})
    assert METHODS["gradcam"](EvalContext(absent, toy_layout, torch.device("cpu"), truth)) is None
    assert isinstance(METHODS["random"](EvalContext(absent, toy_layout, torch.device("cpu"), truth)), RandomMaps)

    torch.manual_seed(0)
    weights = save_backbone(tmp_path / "cnn.pt", build_toy("cnn", 8), "toy:cnn", 8, toy_preprocess("cnn", 32))
    params = Params.model_validate({"backbone": {"arch": "toy:cnn", "weights": str(weights)}, "evaluate": {"cam_methods": ["gradcam"]}})
    context = EvalContext(params, toy_layout, torch.device("cpu"), truth)
    assert METHODS["gradcam++"](context) is None  # not in evaluate.cam_methods
    method = METHODS["gradcam"](context)
    assert isinstance(method, CamBaseline) and method.layer is dict(method.model.named_modules())[params.features.layers[-1]]
    assert method.class_map.outputs == tuple(range(8))  # the toy classes are the toy CNN's outputs
    images = open_store(toy_layout.images)
    batch = EvalBatch(torch.arange(4), torch.from_numpy(images["images"][:4]), torch.from_numpy(images["labels"][:4]))
    maps = method.class_maps(batch)  # the loaded backbone's parameters are frozen
    assert maps.shape == (4, 32, 32) and maps.max().item() == pytest.approx(1.0)
    new_head = params.model_copy(update={"backbone": params.backbone.model_copy(update={"new_head": True})})
    assert METHODS["gradcam"](EvalContext(new_head, toy_layout, torch.device("cpu"), truth)) is None  # no output per class


# ------------------------------------------------------------------------------ the whole pass
@dataclass
class Oracle(ConceptMapMethod):
    """Ground truth as maps: concept masks for every concept, the class mask as class map."""

    masks: zarr.Array
    truth: GroundTruth
    name: str = "oracle"

    def _masks(self, batch: EvalBatch) -> torch.Tensor:
        return torch.from_numpy(read_rows(self.masks, batch.index.numpy())).bool()

    def concept_maps(self, batch: EvalBatch) -> ConceptMaps:
        return ConceptMaps(self._masks(batch).float(), torch.arange(self.truth.n_concepts))

    def class_maps(self, batch: EvalBatch) -> torch.Tensor:
        return self.truth.class_masks(self._masks(batch), batch.labels).float()

    def accuracy_path(self) -> list[tuple[float, float]]:
        return [(1.0, 0.5), (2.0, 0.75)]


def test_evaluate_methods_end_to_end(toy_layout: Layout):
    truth = GroundTruth.from_info(read_dataset_info(toy_layout.dataset_info))
    masks = open_store(toy_layout.images)["masks"]
    torch.manual_seed(0)
    model = build_toy("cnn", len(truth.class_names)).eval()
    identity = ClassMap(tuple(range(len(truth.class_names))), len(truth.class_names), "toy world")
    methods = [
        Oracle(masks, truth),
        RandomMaps(truth.n_concepts, seed=0),
        CentrePrior(),
        CamBaseline("gradcam", model, model.layer3, toy_preprocess("cnn", 32), batch_size=8, class_map=identity),
    ]
    indices = split_indices(read_manifest(toy_layout.manifest), "test")
    params = EvaluateParams(batch_size=10, steps=21)
    evaluation = evaluate_methods(methods, open_store(toy_layout.images), masks, indices, truth, params, torch.device("cpu"))

    assert evaluation.n_images == 24
    assert set(evaluation.concept_maps) == {"oracle", "random"}
    assert set(evaluation.segmentation) == {"oracle", "random", "centre", "gradcam"}
    for group in evaluation.concept_maps["oracle"].values():
        paper = {key: group[key] for key in ("nra", "nra_chance", "epg", "hit", "coverage")}
        assert paper == {"nra": pytest.approx(1.0), "nra_chance": pytest.approx(1.0), "epg": 1.0, "hit": 1.0, "coverage": 1.0}
        assert group["auc"] == pytest.approx(group["auc_high"]) and group["epg_authors"] == 1.0 and group["hit_authors"] == 1.0
    assert set(evaluation.concept_maps["oracle"]) == {"avg", "color", "shape", "pattern", "background"}
    # random maps: 0 under the chance lower curve, above 0 under CE-FAM's a·n (spatial.py), and no hits
    random = evaluation.concept_maps["random"]["avg"]
    assert abs(random["nra_chance"]) < 0.05 and 0.05 < random["nra"] < 0.4 and random["hit"] < 0.05
    assert evaluation.segmentation["oracle"] == {"pixel_acc": 1.0, "miou": 1.0, "map": 1.0}
    for scores in evaluation.segmentation.values():
        assert all(0 <= v <= 1 for v in scores.values())

    curves = evaluation.iou_curves.pivot(index="top_percent", columns="method", values="iou")
    # CE-FAM's grid: pixel steps through the first of the 20 bins of a 32 x 32 image, then the bins
    assert list(curves.index) == pytest.approx((cefam_fractions(32 * 32, bins=20) * 100).tolist())
    assert curves.index[1] == pytest.approx(100 / 1024) and curves.index[-2] == pytest.approx(95)
    np.testing.assert_allclose(curves["oracle"], curves[IDEAL], atol=1e-12)  # the mask ranked first is the ideal curve
    np.testing.assert_allclose(curves["random"], curves[CHANCE], atol=0.02)
    assert (curves[CEFAM_LOWER] <= curves[CHANCE] + 1e-12).all()  # CE-FAM's lower curve lies below chance
    assert evaluation.accuracy_path.to_dict("records") == [
        {"method": "oracle", "nonzeros_per_class": 1.0, "accuracy": 0.5},
        {"method": "oracle", "nonzeros_per_class": 2.0, "accuracy": 0.75},
    ]

    write_evaluation(evaluation, toy_layout)
    metrics = json.loads(toy_layout.evaluate_metrics.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert metrics["segmentation"]["oracle"] == {"pixel_acc": 1.0, "miou": 1.0, "map": 1.0}
    assert metrics["concept_maps"]["random"]["avg"].keys() == {
        "nra", "nra_chance", "epg", "hit", "auc", "auc_high", "auc_low", "coverage",
        "nra_authors", "epg_authors", "hit_authors", "auc_authors", "auc_high_authors", "auc_low_authors",
    }
    table = toy_layout.evaluate_summary.read_text()
    assert table == summary_table(evaluation)
    header = "| method | NRA | NRA (chance) | EPG | Hit rate | coverage | NRA (authors) | EPG (authors) | Hit (authors) |"
    assert header + " pixel acc | mIoU | mAP |" in table
    assert "| oracle | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | " in table  # then the authors' (NRA not quite 1) and segmentation
    assert "| centre | – | – | – | – | – |" in table
    assert "| oracle | color | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in table  # the per-type table
    assert toy_layout.iou_curves.read_text().startswith("method,top_percent,iou\n")


def test_random_maps_are_reproducible_per_batch(toy_layout: Layout):
    images = open_store(toy_layout.images)
    batch = EvalBatch(torch.arange(4), torch.from_numpy(images["images"][:4]), torch.from_numpy(images["labels"][:4]))
    method = RandomMaps(17, seed=0)
    first, again = method.concept_maps(batch), method.concept_maps(batch)
    assert first.maps.shape == (4, 17, 32, 32) and torch.equal(first.maps, again.maps)
    assert not torch.equal(method.class_maps(batch), RandomMaps(17, seed=1).class_maps(batch))


# ------------------------------------------------------------------------------------------- CLI
def test_cli_writes_metrics_and_reports_missing_inputs(toy_layout: Layout, monkeypatch: pytest.MonkeyPatch):
    base = toy_layout.root.parent.parent
    monkeypatch.chdir(base)
    config = {
        "data": TOY_DATA.model_dump(mode="json"),
        "runtime": {"device": "cpu"},
        "evaluate": {"cam_methods": [], "max_images": 12, "steps": 11},
    }
    (base / "params.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["evaluate", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    assert "2 methods on 12 images" in result.output
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert set(metrics["segmentation"]) == {"random", "centre"} and set(metrics["concept_maps"]) == {"random"}

    config["data"]["name"] = "absent"
    (base / "params.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["evaluate", "--params", "params.yaml"])
    assert result.exit_code == 2 and "dataset info not found" in result.output


def test_data_without_masks_writes_every_output_as_a_stub_saying_why(tmp_path: Path) -> None:
    """evaluate on an image folder: {"skipped": reason} metrics, the IoU plot's header alone, the
    reason as the table; the accuracy paths (no masks needed) in full. `metrics/evaluate.json` stays
    valid JSON for `dvc metrics show`."""
    from lib.core.skipped import no_masks
    from lib.evaluate.run import IOU_COLUMNS, Evaluation
    from lib.evaluate.stage import EvaluateReport

    reason = no_masks("imagefolder")
    assert reason is not None and no_masks("toy") is None and no_masks("segfolder") is None
    paths = pd.DataFrame([("salf", 0.0, 0.5), ("salf", 3.0, 0.9)], columns=["method", "nonzeros_per_class", "accuracy"])
    evaluation = Evaluation(0, {}, {}, pd.DataFrame(columns=IOU_COLUMNS), paths, unscored=reason)
    layout = Layout(tmp_path / "data" / "photos", tmp_path / "metrics")
    write_evaluation(evaluation, layout)
    assert json.loads(layout.evaluate_metrics.read_text()) == {"skipped": reason}
    assert layout.iou_curves.read_text() == "method,top_percent,iou\n"
    assert pd.read_csv(layout.accuracy_path).values.tolist() == paths.values.tolist()
    assert layout.evaluate_summary.read_text() == f"Concept maps and segmentation skipped: {reason}.\n"
    report = EvaluateReport(evaluation, layout)
    assert report.details() == ""
    assert report.summary() == f"concept maps and segmentation skipped: {reason}; accuracy paths of salf -> {layout.accuracy_path}"
