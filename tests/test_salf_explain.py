"""SALF-CBM explanations: contributions, heatmaps, probe, intervention, gallery, figures."""

import json

import pytest
import torch
from PIL import Image

from lib.kernels.preprocess import Preprocess
from lib.kernels.registration import Registration
from lib.methods.salf.explain import (
    ConceptClassifier,
    contributions,
    explain_batch,
    intervene,
    probe,
    roi_mask,
    top_activating,
)
from lib.methods.salf.figures import explanation_figure, gallery_figure, loss_curve_figure, path_figure
from lib.methods.salf.glm import fit_elastic_net_path
from lib.methods.salf.pooling import Standardiser, pool_concepts

SIZE = (16, 16)
VIEW = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # CLIP and backbone see the stored image as is
GEOMETRY = Registration(SIZE, 3, VIEW, VIEW)  # grid 3 -> prompt centres at pixels 4, 8, 12
CONCEPTS = ("blue", "star", "sand", "water")
CLASSES = ("desert_star", "sea_star", "blue_thing")


def make_classifier(pooling="avg", seed=0):
    g = torch.Generator().manual_seed(seed)
    train_maps = torch.randn(40, 4, 3, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None, None]
    weight = torch.tensor([[0.0, 1.5, 2.0, -1.0], [0.0, 1.0, -1.0, 2.5], [3.0, 0.0, 0.0, 0.0]])
    return ConceptClassifier(
        pooling=pooling,
        standardiser=Standardiser.fit([pool_concepts(train_maps, pooling)]),
        weight=weight,
        bias=torch.tensor([0.1, -0.2, 0.3]),
        concept_names=CONCEPTS,
        class_names=CLASSES,
    )


def test_contributions_sum_with_bias_to_the_logit():
    clf = make_classifier()
    maps = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    result = contributions(clf, maps)
    assert torch.equal(result.classes, result.logits.argmax(dim=1))
    chosen = result.logits.gather(1, result.classes[:, None]).squeeze(1)
    torch.testing.assert_close(result.scores.sum(dim=1) + clf.bias[result.classes], chosen)
    # A chosen class: class 2 only uses "blue", so every other contribution is exactly zero.
    fixed = contributions(clf, maps, classes=2)
    assert torch.equal(fixed.scores[:, 1:], torch.zeros(5, 3))
    torch.testing.assert_close(fixed.scores[:, 0], 3.0 * fixed.activations[:, 0])


def test_explain_batch_top_concepts_heatmaps_and_record():
    clf = make_classifier()
    maps = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    result = explain_batch(clf, maps, GEOMETRY, k=2)
    assert result.top.shape == (3, 2) and result.heatmaps.shape == (3, 2, 16, 16)
    top_abs = result.scores.abs().gather(1, result.top)
    assert (top_abs[:, 0] >= top_abs[:, 1]).all()
    assert (top_abs[:, 1:] >= result.scores.abs().sort(dim=1).values[:, -2:-1]).all()
    torch.testing.assert_close(result.heatmaps[1, 0], GEOMETRY.upsample(maps[1, result.top[1, 0]]))
    record = json.loads(json.dumps(result.record(1, clf)))
    assert record["predicted"] == record["class"] == int(result.logits[1].argmax())
    assert [c["index"] for c in record["concepts"]] == result.top[1].tolist()
    assert record["concepts"][0]["contribution"] == pytest.approx(float(result.scores[1, result.top[1, 0]]))


def test_upsampling_interpolates_between_prompt_centres():
    maps = torch.arange(9.0).view(3, 3)  # value = 3 h + w
    up = GEOMETRY.upsample(maps)
    centres = [4, 8, 12]
    for h, y in enumerate(centres):
        for w, x in enumerate(centres):
            assert up[y, x].item() == 3 * h + w
    assert up[6, 4].item() == pytest.approx(1.5)  # halfway between rows 0 and 1
    assert up[0, 0].item() == 0.0 and up[15, 15].item() == 8.0  # constant beyond the outer centres
    torch.testing.assert_close(GEOMETRY.upsample(torch.full((2, 3, 3), 7.0)), torch.full((2, 16, 16), 7.0))


def test_probe_matches_brute_force_and_finds_the_planted_concept():
    clf = make_classifier()
    maps = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(3))
    maps[2, 0, 2] += 20.0  # "sand" strongly in the top-right cell
    result = probe(clf, maps, (10, 0, 16, 6), GEOMETRY, k=4)
    mask = roi_mask((10, 0, 16, 6), SIZE)
    brute = (GEOMETRY.upsample(clf.standardised_maps(maps)) * mask).sum(dim=(1, 2))
    assert result["concepts"][0]["name"] == "sand"
    assert [c["index"] for c in result["concepts"]] == brute.argsort(descending=True).tolist()
    expected = brute.sort(descending=True).values.tolist()
    assert [c["score"] for c in result["concepts"]] == pytest.approx(expected, rel=1e-5)
    assert result["roi_pixels"] == 36
    as_mask = probe(clf, maps, mask, GEOMETRY, k=1)
    assert as_mask["concepts"][0] == result["concepts"][0]


def footprint_shares(mask: torch.Tensor) -> torch.Tensor:
    """(3, 3) share of each cell's upsampled footprint inside `mask`, by brute force over unit maps."""
    units = GEOMETRY.upsample(torch.eye(9).view(9, 3, 3))  # (9, H, W): where each cell's value goes
    return ((units * mask).sum(dim=(1, 2)) / units.sum(dim=(1, 2))).view(3, 3)


@pytest.mark.parametrize("pooling", ["avg", "max", "softmax"])
def test_intervention_changes_logits_by_exactly_one_edit(pooling):
    clf = make_classifier(pooling)
    maps = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(4))
    before = maps.clone()
    beta = 2.0
    result = intervene(clf, maps, "star", (0, 0, 10, 10), beta, GEOMETRY)
    assert torch.equal(maps, before)
    share = footprint_shares(roi_mask((0, 0, 10, 10), SIZE))
    # per axis, pixels 0-9 hold all of cell 0's footprint (weights 1 on 0-4, then .75 .5 .25), 3.25 of
    # cell 1's 4 (.25 .5 .75 1 .75 on 5-9) and .25 of cell 2's 5.5 (pixel 9): the box reaches all 9 cells
    torch.testing.assert_close(share[[0, 1, 2], [0, 1, 2]], torch.tensor([1.0, (3.25 / 4) ** 2, (0.25 / 5.5) ** 2]))
    assert result["cells"] == 9 and result["concept_index"] == 1
    assert result["cell_share"] == pytest.approx(float(share.sum()), rel=1e-5)
    delta = torch.tensor(result["new_logits"]) - torch.tensor(result["old_logits"])
    torch.testing.assert_close(delta, clf.weight[:, 1] * result["delta_activation"])
    edited = maps.clone()
    edited[1] += beta * clf.standardiser.std[1] * share
    pooled = clf.standardiser(pool_concepts(torch.stack([maps, edited]), pooling))[:, 1]
    expected = pooled[1] - pooled[0]
    assert result["delta_activation"] == pytest.approx(float(expected), abs=1e-5)
    if pooling == "avg":  # by hand: beta (in std units) * mean share; the buggy double edit gives twice this
        assert result["delta_activation"] == pytest.approx(beta * float(share.mean()), abs=1e-5)
        whole = intervene(clf, maps, "star", (0, 0, 16, 16), beta, GEOMETRY)
        assert whole["cells"] == 9 and whole["delta_activation"] == pytest.approx(beta, abs=1e-5)
    assert result["target_class"] == result["old_class"]
    assert result["target_logit_change"] == pytest.approx(float(delta[result["old_class"]]), abs=1e-6)
    chosen = intervene(clf, maps, "star", (0, 0, 10, 10), beta, GEOMETRY, target=2)
    assert chosen["target_class_name"] == "blue_thing" and chosen["target_logit_change"] == pytest.approx(0.0, abs=1e-6)


def test_probe_and_intervention_agree_on_regions():
    """One rule: the cells a region moves are exactly the cells the probe reads, also for a region
    that covers no prompt centre (centres at 4, 8, 12: the box below lies between them)."""
    clf = make_classifier()
    g = torch.Generator().manual_seed(9)
    box = (5, 9, 7, 11)  # x 5-6, y 9-10
    maps = torch.randn(4, 3, 3, generator=g)
    edited = intervene(clf, maps, "sand", box, 1.0, GEOMETRY)
    assert edited["cells"] == 4 and edited["delta_activation"] > 0  # rows 1-2 x columns 0-1
    # the probe reads a concept in this region only through those 4 cells
    read = []
    for h in range(3):
        for w in range(3):
            bumped = maps.clone()
            bumped[2, h, w] += 1.0
            gain = probe(clf, bumped, box, GEOMETRY, k=4)
            base = probe(clf, maps, box, GEOMETRY, k=4)
            score = {c["name"]: c["score"] for c in gain["concepts"]}["sand"]
            read.append(score != pytest.approx({c["name"]: c["score"] for c in base["concepts"]}["sand"], abs=1e-6))
    share = footprint_shares(roi_mask(box, SIZE))
    assert read == (share > 0).flatten().tolist() and sum(read) == 4


def test_intervention_can_flip_the_prediction():
    clf = make_classifier()
    maps = torch.zeros(4, 3, 3)
    result = intervene(clf, maps, 0, (0, 0, 16, 16), 50.0, GEOMETRY)  # lots of "blue" everywhere
    assert result["new_class_name"] == "blue_thing"
    assert result["new_logits"][2] > max(result["new_logits"][:2])


def test_bad_inputs_raise_clear_errors():
    clf = make_classifier()
    maps = torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match=r"ROI box \(0, 0, 20, 5\) is empty or outside the 16x16 image"):
        probe(clf, maps, (0, 0, 20, 5), GEOMETRY, k=1)
    with pytest.raises(ValueError, match="empty or outside"):
        roi_mask((5, 5, 5, 9), SIZE)
    with pytest.raises(ValueError, match="ROI mask is empty"):
        probe(clf, maps, torch.zeros(16, 16, dtype=torch.bool), GEOMETRY, k=1)
    with pytest.raises(ValueError, match=r"ROI mask must have shape \(16, 16\)"):
        roi_mask(torch.ones(8, 8, dtype=torch.bool), SIZE)
    with pytest.raises(ValueError, match="unknown concept 'red'; known: blue, star, sand, water"):
        intervene(clf, maps, "red", (0, 0, 8, 8), 1.0, GEOMETRY)
    with pytest.raises(ValueError, match=r"concept index 4 out of range \[0, 4\)"):
        intervene(clf, maps, 4, (0, 0, 8, 8), 1.0, GEOMETRY)
    with pytest.raises(ValueError, match=r"class index 3 out of range; allowed integers in \[0, 3\)"):
        explain_batch(clf, maps[None], GEOMETRY, k=2, classes=3)
    with pytest.raises(ValueError, match=r"class index -1 out of range; allowed integers in \[0, 3\)"):
        intervene(clf, maps, "star", (0, 0, 8, 8), 1.0, GEOMETRY, target=-1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        probe(clf, maps, (0, 0, 8, 8), GEOMETRY, k=5)


def test_top_activating_streams_the_global_top_k():
    acts = torch.randn(23, 5, generator=torch.Generator().manual_seed(5))
    values, indices = top_activating(acts.split(4), k=3)
    expected = acts.T.topk(3, dim=1)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(indices, expected.indices)
    with pytest.raises(ValueError, match="at least k=30"):
        top_activating(acts.split(4), k=30)


def test_figures_render_to_png(tmp_path):
    clf = make_classifier()
    maps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(7))
    result = explain_batch(clf, maps, GEOMETRY, k=3)
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(8))
    y = x[:, :3].argmax(dim=1)
    path = fit_elastic_net_path((x, y), (x, y), n_classes=3, n_lambdas=4, lambda_min_ratio=0.1)
    history = {"step": [1, 2, 3], "train_loss": [-0.1, -0.3, -0.5], "val_step": [3], "val_loss": [-0.4], "best_step": 3}
    figures = {
        "explanation": explanation_figure(image, result.record(0, clf), result.heatmaps[0]),
        "gallery": gallery_figure(torch.rand(2, 3, 3, 16, 16), ["blue", "star"], torch.randn(2, 3)),
        "loss": loss_curve_figure(history),
        "path": path_figure(path, selected=2),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png", dpi=60)
        with Image.open(tmp_path / f"{name}.png") as png:
            assert png.format == "PNG" and min(png.size) > 100
    with pytest.raises(ValueError, match=r"heatmaps must be \(3, 16, 16\)"):
        explanation_figure(image, result.record(0, clf), result.heatmaps[0, :2])
