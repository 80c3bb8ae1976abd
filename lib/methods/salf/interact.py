"""The interactive commands' work (probe, intervene): one image, one region, a JSON-ready result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from torch import Tensor

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import Params
from lib.methods.salf.artifacts import SalfModel
from lib.methods.salf.explain import intervene, probe
from lib.methods.salf.images import load_inputs, parse_roi

__all__ = ["InterveneReport", "ProbeReport", "run_intervene", "run_probe"]


def _one_image(
    config: Params, layout: Layout, device: torch.device, rows: Sequence[int], files: Sequence[Path]
) -> tuple[SalfModel, Tensor]:
    """The trained model and the concept maps (M, G, G) of the single image a command works on."""
    if len(rows) + len(files) != 1:
        raise UserError("give exactly one image: --index ROW or --image FILE")
    model = SalfModel.load(layout, device)
    return model, load_inputs(model, config, layout, rows, files).maps[0]


@dataclass(frozen=True)
class ProbeReport:
    result: dict  # lib.methods.salf.explain.probe's

    def summary(self) -> str:
        return ", ".join(f"{c['name']} {c['score']:.2f}" for c in self.result["concepts"])


def run_probe(
    config: Params, layout: Layout, device: torch.device, progress: Progress | None = None, *,
    rows: Sequence[int] = (), files: Sequence[Path] = (), box: str | None = None, mask: Path | None = None,
    top_k: int | None = None,
) -> ProbeReport:  # fmt: skip
    """probe: the top-k concepts (default explain.top_k) inside a box or mask of one image."""
    roi = parse_roi(box, mask)
    model, maps = _one_image(config, layout, device, rows, files)
    k = top_k if top_k is not None else min(config.explain.top_k, maps.shape[0])
    return ProbeReport(probe(model.classifier, maps, roi, model.registration, k=k))


@dataclass(frozen=True)
class InterveneReport:
    result: dict  # lib.methods.salf.explain.intervene's

    def summary(self) -> str:
        r = self.result
        old, new = r["old_class"], r["new_class"]
        return (
            f"{r['concept']} {r['beta']:+g} on {r['cells']} cells ({r['cell_share']:.2f} cells' worth): {r['old_class_name']} "
            f"({r['old_logits'][old]:.2f}) -> {r['new_class_name']} ({r['new_logits'][new]:.2f}); "
            f"{r['target_class_name']} logit {r['target_logit_change']:+.3f}"
        )


def run_intervene(
    config: Params, layout: Layout, device: torch.device, progress: Progress | None = None, *,
    concept: str, beta: float, rows: Sequence[int] = (), files: Sequence[Path] = (), box: str | None = None,
    mask: Path | None = None, class_index: int | None = None,
) -> InterveneReport:  # fmt: skip
    """intervene: add beta to one concept's map inside a region of one image, re-pool and re-classify."""
    roi = parse_roi(box, mask)
    model, maps = _one_image(config, layout, device, rows, files)
    return InterveneReport(intervene(model.classifier, maps, concept, roi, beta, model.registration, target=class_index))
