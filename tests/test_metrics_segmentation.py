"""Zero-shot segmentation scores (Chefer et al. protocol): hand-computed answers and references."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, jaccard_score
from torchmetrics.classification import BinaryAveragePrecision, BinaryJaccardIndex

from lib.kernels.cam import random_maps
from lib.metrics.segmentation import COUNT_KEYS, aggregate_segmentation, average_precision, segmentation_scores

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed_2x2(device):
    maps = torch.tensor([[[0.9, 0.8], [0.1, 0.2]]], device=device)
    masks = torch.tensor([[[True, False], [False, False]]], device=device)
    # normalised [[1, .875], [0, .125]], mean .5 -> foreground = top row
    s = segmentation_scores(maps, masks)
    assert s["pixel_acc"].item() == pytest.approx(3 / 4)
    assert s["iou_fg"].item() == pytest.approx(1 / 2)
    assert s["iou_bg"].item() == pytest.approx(2 / 3)
    assert s["miou"].item() == pytest.approx(7 / 12)
    assert s["ap_fg"].item() == pytest.approx(1.0)  # the mask pixel ranks first
    # two channels: thresholds 1 (2 of 2 right), .875 (3 of 4), .125 (4 of 6); 4 positives
    assert s["ap"].item() == pytest.approx(0.5 * 1 + 0.25 * 3 / 4 + 0.25 * 4 / 6)
    assert [s[k].item() for k in COUNT_KEYS] == [3, 4, 1, 2, 2, 3]


def test_matches_sklearn_and_torchmetrics():
    maps = (random_maps((6, 10, 10), seed=0) * 5).floor()  # many ties
    masks = random_maps((6, 10, 10), seed=1) > 0.6
    s = segmentation_scores(maps, masks)
    jaccard, ap = BinaryJaccardIndex(), BinaryAveragePrecision()
    for i in range(6):
        norm = ((maps[i] - maps[i].min()) / (maps[i].max() - maps[i].min())).flatten()
        target = masks[i].flatten()
        fg = norm > norm.mean()
        t, f, p = target.numpy(), fg.numpy(), norm.double().numpy()
        assert s["pixel_acc"][i].item() == pytest.approx(accuracy_score(t, f))
        assert s["iou_fg"][i].item() == pytest.approx(jaccard_score(t, f))
        assert s["iou_fg"][i].item() == pytest.approx(jaccard(fg, target).item())
        assert s["iou_bg"][i].item() == pytest.approx(jaccard_score(t, f, pos_label=False))
        assert s["ap_fg"][i].item() == pytest.approx(average_precision_score(t, p))
        assert s["ap_fg"][i].item() == pytest.approx(ap(norm, target.long()).item(), abs=1e-6)
        both = average_precision_score(np.r_[~t, t], np.r_[1 - p, p])  # Chefer et al.'s get_ap_scores
        assert s["ap"][i].item() == pytest.approx(both)


def test_average_precision_edge_rows():
    scores = torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.9, 0.1, 0.5, 0.2], [0.4, 0.3, 0.2, 0.1]])
    targets = torch.tensor([[True, False, False, False], [False, False, False, False], [True, True, True, True]])
    result = average_precision(scores, targets)
    assert result[0].item() == pytest.approx(0.25)  # all tied: the prevalence
    assert result[1].isnan()  # no positives
    assert result[2].item() == pytest.approx(1.0)


def test_aggregate_pools_counts_over_images():
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]])
    masks = torch.tensor([[[True, True], [False, False]], [[True, True], [True, True]]])
    s = segmentation_scores(maps, masks)
    # image 0: fg {0}; image 1: fg {0,1,2} -> correct 3 + 3; fg I/U 1/2 + 3/4; bg I/U 2/3 + 0/1
    out = aggregate_segmentation(s)
    assert out["pixel_acc"] == pytest.approx(6 / 8)
    assert out["miou"] == pytest.approx((4 / 6 + 2 / 4) / 2)  # pooled, not the per-image mean
    assert out["miou"] != pytest.approx(s["miou"].mean().item())
    assert out["map"] == pytest.approx(s["ap"].mean().item())


def test_aggregate_of_concatenated_batches_equals_one_call():
    maps, masks = random_maps((8, 6, 6), seed=2), random_maps((8, 6, 6), seed=3) > 0.5
    halves = [segmentation_scores(maps[i : i + 4], masks[i : i + 4]) for i in (0, 4)]
    joined = {k: torch.cat([h[k] for h in halves]) for k in halves[0]}
    assert aggregate_segmentation(joined) == pytest.approx(aggregate_segmentation(segmentation_scores(maps, masks)))


def test_scores_ignore_positive_affine_changes_of_the_map():
    maps, masks = random_maps((4, 8, 8), seed=4), random_maps((4, 8, 8), seed=5) > 0.5
    a, b = segmentation_scores(maps, masks), segmentation_scores(3.0 * maps - 7.0, masks)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_constant_map_predicts_background_everywhere():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2] = True  # half the image; image 1 has an empty mask
    s = segmentation_scores(torch.full((2, 4, 4), 0.7), masks)
    assert s["pixel_acc"].tolist() == [0.5, 1.0]
    assert s["iou_fg"][0].item() == 0.0 and s["iou_fg"][1].isnan()
    assert s["miou"].tolist() == [0.25, 1.0]  # image 1: only the background IoU is defined
    assert s["ap"].tolist() == [0.5, 0.5]  # all scores tied: prevalence of the two-channel targets
    assert s["ap_fg"][0].item() == 0.5 and s["ap_fg"][1].isnan()
    assert math.isnan(aggregate_segmentation({k: v[1:] for k, v in s.items()})["miou"])


def test_float_threshold_on_the_normalised_map():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])  # normalised 0, .25, .5, 1
    masks = torch.tensor([[[False, False], [True, True]]])
    assert segmentation_scores(maps, masks, threshold=0.3)["iou_fg"].item() == 1.0
    assert segmentation_scores(maps, masks, threshold=0.0)["iou_fg"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("threshold", ["median", 1.5, -0.1, True])
def test_bad_threshold_raises(threshold):
    with pytest.raises(ValueError, match="threshold must be 'mean' or a float"):
        segmentation_scores(torch.rand(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), threshold)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="masks must be a bool"):
        segmentation_scores(torch.rand(1, 2, 2), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="targets a bool tensor"):
        average_precision(torch.rand(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="missing keys"):
        aggregate_segmentation({"ap": torch.zeros(1)})
