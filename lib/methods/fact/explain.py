"""The fact_explain stage's work: explanation PNGs of test images and a concept gallery.

Per explained image (a seeded sample of fact.explain.n_images test images): its predicted class, the
fact.explain.top_k concepts with the largest contributions C_j to that logit (read from the
contributions stage's concept_stats.zarr), each with its share of the explained logit
C_j / sum_j C_j (= (y_c - b) on B-cos) and its input-level map (FactBackbone.input_maps: B-cos
dynamic linear contributions of P_j, else gradient x input; positive part shown over the image).
The gallery shows, for a seeded sample of alive concepts, their top test images by presence with the
same maps. A latent whose best ground-truth concept (matching.json) correlates with it at least
fact.match_threshold is labelled with that concept's name and the correlation, as a reading aid.

Writes data/<name>/fact/explain/row<index>.png, gallery.png and explanations.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.progress import Progress
from torch import Tensor

from lib.core.layout import Layout
from lib.core.outputs import write_figure, write_json
from lib.core.params import Params
from lib.core.schema import CONTRIBUTION, PRED_MODEL, PRESENCE, STATS_IMAGE
from lib.core.stores import open_store
from lib.data.manifest import read_dataset_info
from lib.methods.fact.artifacts import load_sae
from lib.methods.fact.backbone import FactBackbone, load_fact_backbone
from lib.methods.fact.c2 import TopImages
from lib.methods.fact.matching import Matching
from lib.methods.fact.sae import BiasFreeTopKSAE

__all__ = ["FactExplainReport", "run_fact_explain"]


@dataclass(frozen=True)
class FactExplainReport:
    out_dir: Path
    n_images: int
    gallery: list[int]

    def summary(self) -> str:
        return f"{self.n_images} explanations and a gallery of latents {self.gallery} -> {self.out_dir}"


def _labels(layout: Layout, n_concepts: int) -> dict[int, str]:
    """latent -> 'concept r=0.83' for the latents whose best ground-truth concept reaches the match threshold."""
    data = json.loads(layout.fact_matching.read_text())
    if not data["concepts"]:
        return {}
    matching = Matching.from_json(data)
    return {latent: label for latent in range(n_concepts) if (label := matching.label(latent)) is not None}


def _name(latent: int, labels: dict[int, str]) -> str:
    return f"latent {latent}" + (f" ({labels[latent]})" if latent in labels else "")


def _show(axis: Any, image: np.ndarray, heat: Tensor | None, title: str) -> None:
    axis.imshow(image)
    if heat is not None:
        positive = heat.clamp_min(0)
        axis.imshow((positive / positive.max().clamp_min(1e-12)).cpu().numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    axis.set_title(title, fontsize=7)
    axis.axis("off")


def _maps(backbone: FactBackbone, sae: BiasFreeTopKSAE, images: np.ndarray, latents: list[int]) -> Tensor:
    device = next(backbone.model.parameters()).device
    return backbone.input_maps(torch.from_numpy(images).to(device), sae, torch.tensor(latents, device=device))


def run_fact_explain(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> FactExplainReport:
    """Write the explanation PNGs, gallery.png and explanations.json (module doc)."""
    settings = config.fact.explain
    backbone = load_fact_backbone(config, layout, device)
    sae, _ = load_sae(layout.fact_sae, device)
    stats = open_store(layout.concept_stats("fact"))
    images = open_store(layout.images)["images"]
    classes = read_dataset_info(layout.dataset_info)["classes"]
    labels = _labels(layout, sae.n_concepts)
    out_dir = layout.fact_explain
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*out_dir.glob("*.png"), *out_dir.glob("*.json")):  # a run by hand: dvc repro clears the folder itself
        stale.unlink()

    rng = np.random.default_rng(settings.seed)
    n = stats[STATS_IMAGE].shape[0]
    chosen = np.sort(rng.choice(n, size=min(settings.n_images, n), replace=False))
    records = []
    for i in chosen:
        row, predicted = int(stats[STATS_IMAGE][i]), int(stats[PRED_MODEL][i])
        contribution = torch.from_numpy(stats[CONTRIBUTION][i])
        total = float(contribution.sum())
        top = contribution.topk(min(settings.top_k, len(contribution))).indices.tolist()
        picture = images[row]
        maps = _maps(backbone, sae, np.repeat(picture[None], len(top), axis=0), top)
        figure = Figure(figsize=(1.8 * (len(top) + 1), 2.3), layout="constrained")  # fits the 3-line title
        axes = figure.subplots(1, len(top) + 1)
        name = classes[predicted] if predicted >= 0 else "the backbone's top output"  # -1: backbone.new_head
        _show(axes[0], picture, None, f"row {row}\npredicted {name}\nlogit - bias {total:.3g}")
        concepts = []
        for axis, latent, heat in zip(axes[1:], top, maps, strict=True):
            value = float(contribution[latent])
            share = value / total if total else float("nan")
            _show(axis, picture, heat, f"{_name(latent, labels)}\nC={value:.3g} ({share:.0%})")
            concepts.append({"latent": latent, "label": labels.get(latent), "contribution": value, "share": share})
        write_figure(out_dir / f"row{row}.png", figure)
        records.append({"row": row, "predicted": name, "explained_logit": total, "concepts": concepts})
    write_json(out_dir / "explanations.json", records)

    presence, contributions, image_rows = stats[PRESENCE], stats[CONTRIBUTION], stats[STATS_IMAGE]
    rows_per_shard = (presence.shards or presence.chunks)[0]
    spans = [slice(start, min(start + rows_per_shard, n)) for start in range(0, n, rows_per_shard)]
    alive = np.zeros(presence.shape[1], dtype=bool)
    for span in spans:
        alive |= (contributions[span] != 0).any(axis=0)
    gallery = sorted(rng.choice(np.flatnonzero(alive), size=min(settings.gallery_concepts, int(alive.sum())), replace=False).tolist())
    top_images = TopImages(min(settings.gallery_images, n))
    for span in spans:
        top_images.add(torch.from_numpy(presence[span][:, gallery]), torch.from_numpy(image_rows[span]))
    selected = top_images.result()
    figure = Figure(figsize=(1.6 * selected.index.shape[1], 1.8 * len(gallery)), layout="constrained")
    axes = np.asarray(figure.subplots(len(gallery), selected.index.shape[1], squeeze=False))
    for line, latent in enumerate(gallery):
        pictures = np.stack([images[row] for row in selected.index[line].tolist()])
        maps = _maps(backbone, sae, pictures, [latent] * len(pictures))
        for axis, picture, heat, value in zip(axes[line], pictures, maps, selected.presence[line].tolist(), strict=True):
            _show(axis, picture, heat, f"{_name(latent, labels)}\nP={value:.3g}")
    write_figure(out_dir / "gallery.png", figure)
    return FactExplainReport(out_dir, len(records), gallery)
