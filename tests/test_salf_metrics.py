"""SALF-CBM metrics: rule recovery (hand-computed cases) and accuracy from stored logits."""

import numpy as np
import pytest
import torch
import zarr

from lib.methods.salf.metrics import backbone_accuracy, rule_recovery
from lib.models.classes import ClassMap

INFO = {
    "classes": ["desert_star", "blue_stripes"],
    "rules": [
        {"class_id": 0, "concept": "sand"},
        {"class_id": 0, "concept": "star"},
        {"class_id": 1, "concept": "blue"},
        {"class_id": 1, "concept": "striped"},
    ],
}


def test_rule_recovery_counts_rule_concepts_among_the_top_positive_weights():
    names = ["sand", "star", "blue", "water"]  # "striped" is not among the model's concepts
    weight = torch.tensor(
        [
            [2.0, 0.5, 1.0, 0.0],  # top-2: sand, blue -> 1 of {sand, star}
            [0.0, 0.0, 3.0, -1.0],  # top-2: blue, then a zero weight -> 1 of {blue, striped}
        ]
    )
    mean, per_class = rule_recovery(weight, names, INFO)
    assert per_class == {"desert_star": 0.5, "blue_stripes": 0.5} and mean == 0.5
    weight[0, 1] = 3.0  # star overtakes blue
    assert rule_recovery(weight, names, INFO)[1]["desert_star"] == 1.0
    # a zero weight is no evidence even when the rule concept is among the top-|rule| indices
    assert rule_recovery(torch.zeros(2, 4), names, INFO) == (0.0, {"desert_star": 0.0, "blue_stripes": 0.0})


def test_rule_recovery_without_rules_and_with_bad_shapes():
    assert rule_recovery(torch.ones(2, 3), ["a", "b", "c"], {"classes": ["x", "y"], "rules": []}) is None
    with pytest.raises(ValueError, match=r"weight must be \(2, 4\)"):
        rule_recovery(torch.ones(3, 4), ["sand", "star", "blue", "water"], INFO)


def test_backbone_accuracy_restricts_the_argmax_to_the_mapped_outputs(tmp_path):
    # 3 dataset classes on outputs 4, 0, 2 of a 5-output backbone
    class_map = ClassMap((4, 0, 2), 5, "test")
    logits = zarr.create_array(tmp_path / "l.zarr", shape=(6, 5), dtype="float32", shards=(4, 5), chunks=(2, 5))
    labels = zarr.create_array(tmp_path / "y.zarr", shape=(6,), dtype="int64", shards=(4,), chunks=(2,))
    values = np.zeros((6, 5), dtype=np.float32)
    values[[0, 1, 2, 3, 4, 5], [4, 0, 2, 4, 0, 2]] = 2.0  # among the mapped outputs: classes 0, 1, 2, 0, 1, 2
    values[[2, 3], [1, 3]] = 5.0  # rows 2 and 3: an unmapped output wins the unrestricted argmax
    logits[:] = values
    labels[:] = [0, 1, 2, 0, 2, 2]  # row 4 is wrong either way
    rows = np.arange(6)
    assert backbone_accuracy(logits, labels, rows, class_map) == {
        "acc_backbone": pytest.approx(5 / 6), "acc_backbone_unrestricted": pytest.approx(3 / 6)
    }
    assert backbone_accuracy(logits, labels, np.array([1, 3, 5]), class_map, batch_size=2)["acc_backbone"] == 1.0
    with pytest.raises(ValueError, match="rows is empty"):
        backbone_accuracy(logits, labels, np.array([], dtype=np.int64), class_map)
