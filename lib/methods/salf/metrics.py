"""SALF-CBM metrics: backbone accuracy from its stored logits, and rule recovery on the toy world."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from lib.core.streams import batch_source
from lib.models.classes import ClassMap

__all__ = ["backbone_accuracy", "rule_recovery"]


@torch.no_grad()
def backbone_accuracy(
    logits: zarr.Array, labels: zarr.Array, rows: np.ndarray, class_map: ClassMap, batch_size: int = 4096
) -> dict[str, float]:
    """The backbone's test accuracy from its stored logits (N, K) against dataset labels (N,) over
    store `rows`, streamed: "acc_backbone" with the argmax restricted to the outputs the dataset's
    classes map onto, "acc_backbone_unrestricted" with the argmax over all K outputs (right only
    when it is the true class's output; equal to the first when every output is mapped)."""
    if len(rows) == 0:
        raise ValueError("rows is empty: no images to score")
    restricted = unrestricted = 0
    for block in batch_source({"logits": logits, "labels": labels}, rows, batch_size)():
        y = block["labels"].long()
        restricted += int((class_map.predict(block["logits"]) == y).sum())
        unrestricted += int((class_map.top1(block["logits"]) == y).sum())
    return {"acc_backbone": restricted / len(rows), "acc_backbone_unrestricted": unrestricted / len(rows)}


def rule_recovery(
    weight: Tensor, concept_names: Sequence[str], info: Mapping[str, Any]
) -> tuple[float, dict[str, float]] | None:
    """How well the sparse layer W (K, M) found each class's rule (dataset.json "rules").

    Per class: the fraction of its rule's concepts among its top-|rule| concepts by weight,
    counting only positive weights (a zero or negative weight is no evidence for the class).
    Rule concepts match the model's concepts by exact name; one the model lacks counts as missed.
    Returns (mean over classes with a rule, {class name: fraction}), or None without rules.
    """
    rules: dict[int, set[str]] = {}
    for row in info.get("rules") or []:
        rules.setdefault(int(row["class_id"]), set()).add(row["concept"])
    if not rules:
        return None
    classes = info["classes"]
    if weight.shape != (len(classes), len(concept_names)):
        raise ValueError(
            f"weight must be ({len(classes)}, {len(concept_names)}) for the dataset's classes and the model's "
            f"concepts, got {tuple(weight.shape)}"
        )
    weight = weight.detach().cpu()
    per_class = {}
    for class_id, rule in sorted(rules.items()):
        values, indices = weight[class_id].topk(min(len(rule), weight.shape[1]))
        chosen = {concept_names[i] for i, v in zip(indices.tolist(), values.tolist()) if v > 0}
        per_class[classes[class_id]] = len(chosen & rule) / len(rule)
    return float(np.mean(list(per_class.values()))), per_class
