"""What an explanation method gives `evaluate`: the method protocol, its inputs and its factories.

A method is a name plus functions giving maps for a batch of evaluation images:
`concept_maps` (one map per ground-truth concept it covers, scored with NRA / EPG / Hit) and
`class_maps` (one map per image for its class, scored as zero-shot segmentation). Each method has
a factory (EvalContext -> method, or None while the method's stage outputs do not exist yet, so
the stage runs with whatever the pipeline has produced); `lib/evaluate/adapters/__init__.py`
lists every factory in one explicit table, and `build_methods` calls them.

Maps may have any resolution; the evaluator resizes them bilinearly to the image size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lib.core.layout import Layout
from lib.core.params import Params
from lib.evaluate.truth import GroundTruth


@dataclass(frozen=True)
class EvalBatch:
    """A batch of evaluation images, all tensors on the evaluation device."""

    index: Tensor  # int64 (B,): rows of the image store (for methods that read their own stores)
    images: Tensor  # uint8 (B, H, W, 3)
    labels: Tensor  # int64 (B,): true classes


@dataclass(frozen=True)
class ConceptMaps:
    """Maps of the ground-truth concepts a method covers.

    maps: float (B, M', h, w), or (B, M', K, h, w) for K candidate maps per concept, of which the
    one with the best NRA is scored (CE-FAM Table 1: the best of the top-4 layers); concepts:
    int64 (M',), the ground-truth concept id (position in dataset.json's concepts) that channel j
    of `maps` explains. Ground-truth concepts a method leaves out count as misses in its Hit rate.
    sources, source_names: optionally where each candidate came from — int64 (B, M', K) indices
    into source_names (CE-FAM: the layer), so the evaluation reports from which source the
    chosen candidates come (CE-FAM Fig. A1).
    """

    maps: Tensor
    concepts: Tensor
    sources: Tensor | None = None
    source_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.maps.ndim not in (4, 5) or not self.maps.is_floating_point():
            raise ValueError(
                f"ConceptMaps.maps must be a float tensor (B, M', h, w) or (B, M', K, h, w); got {self.maps.dtype} {tuple(self.maps.shape)}"
            )
        if self.concepts.ndim != 1 or self.concepts.numel() != self.maps.shape[1] or self.concepts.is_floating_point():
            raise ValueError(
                f"ConceptMaps.concepts must be integer ids of shape ({self.maps.shape[1]},) (one per map channel); "
                f"got {self.concepts.dtype} {tuple(self.concepts.shape)}"
            )
        if self.sources is not None and (self.maps.ndim != 5 or tuple(self.sources.shape) != tuple(self.maps.shape[:3])):
            raise ValueError(
                f"ConceptMaps.sources must index the candidates: shape {tuple(self.maps.shape[:3])} for maps "
                f"{tuple(self.maps.shape)}; got {tuple(self.sources.shape)}"
            )


@dataclass(frozen=True)
class ConceptContributions:
    """Each scored ground-truth concept's signed contribution to the logit of the class the method's
    model predicts, as the method defines it (lib/compare uses them against true effects).

    values: float (B, M'), NaN where the method gives concept concepts[j] no contribution for that
    image (never 0: an unscored concept is not a zero contribution); concepts: int64 (M',) ids.
    """

    values: Tensor
    concepts: Tensor

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.concepts.ndim != 1 or self.concepts.numel() != self.values.shape[1]:
            raise ValueError(
                "ConceptContributions needs values (B, M') and concepts (M',); "
                f"got {tuple(self.values.shape)} and {tuple(self.concepts.shape)}"
            )


class ConceptMapMethod(Protocol):
    """What the evaluator asks of a method. Subclass it explicitly to inherit the defaults
    (None: "this method does not produce that")."""

    name: str

    def concept_maps(self, batch: EvalBatch) -> ConceptMaps | None:
        """Maps of the ground-truth concepts the method covers, or None."""
        return None

    def class_maps(self, batch: EvalBatch) -> Tensor | None:
        """Float (B, h, w) maps of each image's class (true or predicted, as the method defines), or None."""
        return None

    def concept_contributions(self, batch: EvalBatch) -> ConceptContributions | None:
        """Signed contributions of the ground-truth concepts to the predicted logit, or None."""
        return None

    def accuracy_path(self) -> Sequence[tuple[float, float]] | None:
        """(mean nonzero weights per class, accuracy) along a sparsity path (sparse final layers), or None."""
        return None


@dataclass(frozen=True)
class EvalContext:
    """What a factory may use to build its method."""

    params: Params
    layout: Layout
    device: torch.device
    truth: GroundTruth  # concept names, so a method can map its own vocabulary onto the ground truth


MethodFactory = Callable[[EvalContext], ConceptMapMethod | None]
def build_methods(context: EvalContext, factories: Mapping[str, MethodFactory]) -> tuple[list[ConceptMapMethod], list[str]]:
    """Call every factory: (the methods available, names of those skipped)."""
    methods, skipped = [], []
    for name, factory in factories.items():
        method = factory(context)
        if method is None:
            skipped.append(name)
        elif method.name != name:
            raise ValueError(f"factory registered as {name!r} returned a method named {method.name!r}")
        else:
            methods.append(method)
    return methods, skipped
