"""Ground truth of the evaluation: concept masks from images.zarr and class masks from the rules.

`dataset.json` lists the concepts (name, type; channel k of the masks array is concept k) and the
class rules as rows (class_id, concept_id, concept_type). The segmentation target of an image is
the pixels of the object(s) that satisfy its class rule: the AND of the masks of the rule's
object concepts. Pixels are disjoint between objects and every object concept mask covers whole
objects, so the AND is exactly "objects having all the rule's attributes". Scene concepts (the
toy world's background) describe no object and are left out. A class without object concepts
in its rule has no target; its images are skipped by the segmentation scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lib.core.errors import UserError

SCENE_TYPES = frozenset({"background"})  # concept types that describe the scene, not an object


@dataclass(frozen=True)
class GroundTruth:
    """Concept vocabulary and class rules of a dataset with masks."""

    concept_names: tuple[str, ...]
    concept_types: tuple[str, ...]
    class_names: tuple[str, ...]
    object_rules: Tensor  # bool (C, K): concept k belongs to the object rule of class c

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> GroundTruth:
        """Build from the dict of dataset.json; raise ValueError if it has no concepts."""
        concepts = info.get("concepts") or []
        if not concepts:
            raise UserError(
                "the dataset lists no concepts: the evaluate stage needs ground-truth masks", key="data.kind", value=info.get("kind"),
                fix="use data.kind toy or segfolder (image + mask pairs), or run the stages before evaluate only",
            )
        classes = tuple(info["classes"])
        rules = torch.zeros(len(classes), len(concepts), dtype=torch.bool)
        for row in info.get("rules", []):
            if row["concept_type"] not in SCENE_TYPES:
                rules[row["class_id"], row["concept_id"]] = True
        return cls(tuple(c["name"] for c in concepts), tuple(c["type"] for c in concepts), classes, rules)

    @classmethod
    def without_concepts(cls, classes: list[str] | tuple[str, ...]) -> GroundTruth:
        """The ground truth of data without masks: its classes, no concept (methods build, nothing is scored)."""
        return cls((), (), tuple(classes), torch.zeros(len(classes), 0, dtype=torch.bool))

    @property
    def n_concepts(self) -> int:
        return len(self.concept_names)

    def concept_ids(self, names: list[str] | tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """Match a method's concept names to ground-truth concepts by exact name.

        Returns (positions in `names` that match, int64; their ground-truth ids, int64), so a
        method can keep only the channels the ground truth can score.
        """
        lookup = {name: k for k, name in enumerate(self.concept_names)}
        pairs = [(j, lookup[name]) for j, name in enumerate(names) if name in lookup]
        columns = torch.tensor([j for j, _ in pairs], dtype=torch.int64)
        return columns, torch.tensor([k for _, k in pairs], dtype=torch.int64)

    def class_masks(self, masks: Tensor, labels: Tensor) -> Tensor:
        """Segmentation targets, bool (B, H, W), of concept masks bool (B, K, H, W) and labels (B,).

        All False for an image whose class has no object rule.
        """
        if masks.ndim != 4 or masks.dtype != torch.bool or masks.shape[1] != self.n_concepts:
            raise ValueError(f"masks must be a bool tensor (B, {self.n_concepts}, H, W); got {masks.dtype} {tuple(masks.shape)}")
        if labels.shape != masks.shape[:1] or labels.is_floating_point():
            raise ValueError(f"labels must be integer class ids of shape ({masks.shape[0]},); got {labels.dtype} {tuple(labels.shape)}")
        required = self.object_rules.to(masks.device)[labels]  # (B, K)
        # an unrequired concept must not veto a pixel: OR its mask with True
        inside = (masks | ~required[:, :, None, None]).all(dim=1)
        return inside & required.any(dim=1)[:, None, None]
