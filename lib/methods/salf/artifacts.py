"""SALF-CBM outputs on disk: the bottleneck and classifier files, and the loaded model.

Model files are torch pickles of plain dicts (tensors, strings, numbers) read back with
``weights_only=True``, so loading never executes code from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.outputs import write_atomic
from lib.kernels.registration import Registration
from lib.methods.salf.classifier import ConceptClassifier
from lib.methods.salf.model import ConceptBottleneck
from lib.methods.salf.pooling import Standardiser

__all__ = [
    "SalfModel",
    "load_bottleneck",
    "load_classifier",
    "save_bottleneck",
    "save_classifier",
]


def _load(path: Path, what: str, stage: str) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path}: no SALF-CBM {what}", fix=f"run the {stage} stage first (dvc repro {stage})")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_bottleneck(
    path: Path,
    model: ConceptBottleneck,
    layer: str,
    concepts: list[dict[str, Any]],
    registration: Registration,
    provenance: dict[str, str],
) -> None:
    """Write the bottleneck: its 1x1 conv weight (M, C, 1, 1), the grid's registration (where its
    cells lie; the sampling positions follow from it), backbone layer and concepts
    ([{"name", "type", "cos3"}], one per output channel)."""
    if len(concepts) != model.conv.out_channels:
        raise ValueError(f"got {len(concepts)} concepts for a bottleneck with {model.conv.out_channels} outputs")
    if model.positions is None or not torch.allclose(model.positions.cpu(), registration.feature_grid()):
        raise ValueError("the bottleneck does not sample at the registration's positions")
    state = {
        "weight": model.conv.weight.detach().cpu(),
        "registration": registration.to_dict(),
        "layer": layer,
        "concepts": concepts,
        "provenance": provenance,
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_bottleneck(path: Path, device: torch.device | str = "cpu") -> tuple[ConceptBottleneck, dict[str, Any]]:
    """(bottleneck in eval mode on `device`, the saved dict: "layer", "registration" (a
    :class:`Registration`), "concepts", "provenance")."""
    state = _load(path, "bottleneck", "cbl")
    if "registration" not in state:
        raise UserError(f"{path} predates the grid registration", fix="re-run the cbl stage (dvc repro cbl)")
    state["registration"] = Registration.from_dict(state["registration"])
    weight = state["weight"]
    model = ConceptBottleneck(weight.shape[1], weight.shape[0], state["registration"].feature_grid())
    with torch.no_grad():
        model.conv.weight.copy_(weight)
    return model.to(device).eval(), state


def save_classifier(
    path: Path,
    classifier: ConceptClassifier,
    dense: tuple[Tensor, Tensor],
    lambda_path: list[dict[str, float]],
    selected: int,
    provenance: dict[str, str],
) -> None:
    """Write the final layers: pooling, train mean/std of c*, sparse W (K, M) and b (K,), the
    dense comparison layer, and the lambda path summary with the selected entry."""
    state = {
        "pooling": classifier.pooling,
        "mean": classifier.standardiser.mean.cpu(),
        "std": classifier.standardiser.std.cpu(),
        "weight": classifier.weight.cpu(),
        "bias": classifier.bias.cpu(),
        "dense_weight": dense[0].cpu(),
        "dense_bias": dense[1].cpu(),
        "concepts": list(classifier.concept_names),
        "classes": list(classifier.class_names),
        "path": lambda_path,
        "selected": selected,
        "provenance": provenance,
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_classifier(path: Path, device: torch.device | str = "cpu") -> tuple[ConceptClassifier, dict[str, Any]]:
    """(the sparse final layer on `device`, the saved dict: "path", "selected", "provenance", ...)."""
    state = _load(path, "classifier", "sparse")
    classifier = ConceptClassifier(
        pooling=state["pooling"],
        standardiser=Standardiser(state["mean"], state["std"]).to(device),
        weight=state["weight"].to(device),
        bias=state["bias"].to(device),
        concept_names=tuple(state["concepts"]),
        class_names=tuple(state["classes"]),
    )
    return classifier, state


@dataclass(frozen=True)
class SalfModel:
    """A trained SALF-CBM: bottleneck (features -> concept maps) and the sparse final layer."""

    bottleneck: ConceptBottleneck
    layer: str  # the backbone layer whose features it reads
    registration: Registration  # where the grid cells lie in the stored image and the backbone's input
    classifier: ConceptClassifier
    concept_types: tuple[str | None, ...]
    lambda_path: list[dict[str, float]]  # lib.methods.salf.glm.ElasticNetPath.summary() rows
    selected: int  # the chosen entry of lambda_path

    @classmethod
    def load(cls, layout: Layout, device: torch.device | str = "cpu") -> SalfModel:
        """Load the cbl and sparse stages' outputs onto `device`."""
        bottleneck, meta = load_bottleneck(layout.salf_bottleneck, device)
        classifier, state = load_classifier(layout.salf_classifier, device)
        names = tuple(c["name"] for c in meta["concepts"])
        if classifier.concept_names != names:
            raise ValueError(
                f"{layout.salf_classifier} was trained on other concepts than {layout.salf_bottleneck}; "
                "rerun the sparse stage"
            )
        types = tuple(c["type"] for c in meta["concepts"])
        return cls(bottleneck, meta["layer"], meta["registration"], classifier, types, state["path"], state["selected"])

    @torch.no_grad()
    def concept_maps(self, features: Tensor) -> Tensor:
        """Raw concept maps (B, M, G, G) float32 of backbone features (B, C, h, w)."""
        return self.bottleneck(features.to(self.bottleneck.conv.weight.device))
