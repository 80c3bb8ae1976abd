"""The fact_explain stage's work: FaCT's figures for test images and concepts (their
fact/plotting/plot_inference.py).

Per explained image (a seeded sample of fact.explain.n_images test images) and logit c (the spliced
model's prediction, or the dataset class fact.explain.logit), row<index>.png shows:
- the image, with the explained class and y_c - b (= sum_j C_j on B-cos);
- the logit's own input map: W(x) of y_c for the spliced model;
- the fact.explain.top_k concepts with the largest C_j, each as the input map of its presence P_j,
  titled with its share of the positive contributions C_j / sum_{C > 0} C (FaCT's figures);
- "other concepts": the input map of sum_{j not shown} C_j and its share of the explained logit,
  (sum_j C_j - shown) / (y_c - b), as the authors compute it.
Contributions are computed here for the explained logit (lib/methods/fact/contributions.py).
Input maps are drawn as B-cos colour images (bcos.common.gradient_to_image: RGB from W(x), alpha
from ||W(x)|| with negative contributions hidden, smoothed by fact.explain.smooth, scaled to the
fact.explain.alpha_percentile percentile); on backbones without B-cos input encoding ([x, 1 - x])
the positive part of gradient x input is drawn as a heat map instead.

gallery.png: per concept (fact.explain.concepts, or a seeded sample of fact.explain.gallery_concepts
alive ones), its top fact.explain.gallery_images test images by presence (those where it is present)
with their maps.
local_row<index>_latent<j>.png (the local-and-global figure): an explained image's map of concept j
beside that concept's top images; for the image's shown concepts that are in fact.explain.concepts,
else for its top concept. A latent whose best ground-truth concept (matching.json) reaches
fact.match_threshold is labelled with it, as a reading aid. explanations.json has the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bcos.common import gradient_to_image
from bcos.data.transforms import AddInverse
from matplotlib.figure import Figure
from rich.progress import Progress
from torch import Tensor

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.outputs import write_figure, write_json
from lib.core.params import FactExplainParams, Params
from lib.core.schema import CONTRIBUTION, FEATURES, PRESENCE, STATS_IMAGE
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.data.manifest import read_dataset_info
from lib.methods.fact.artifacts import load_sae
from lib.methods.fact.backbone import FactBackbone, load_fact_backbone
from lib.methods.fact.c2 import SelectedImages, TopImages
from lib.methods.fact.contributions import concept_contributions, splice
from lib.methods.fact.matching import Matching
from lib.methods.fact.sae import BiasFreeTopKSAE

__all__ = ["FactExplainReport", "code_weights", "colour_map", "run_fact_explain"]


@dataclass(frozen=True)
class FactExplainReport:
    out_dir: Path
    n_images: int
    gallery: list[int]

    def summary(self) -> str:
        return f"{self.n_images} explanations and a gallery of latents {self.gallery} -> {self.out_dir}"


def colour_map(inputs: Tensor, weights: Tensor, smooth: int, alpha_percentile: float) -> np.ndarray:
    """The B-cos colour image (H, W, 4) of a dynamic linear map `weights` (6, H, W) on `inputs` (6, H, W)
    = [x, 1 - x] (bcos.common.gradient_to_image); for other inputs (C != 6) the positive part of
    (weights * inputs).sum(0) as an inferno heat map with alpha 0.6."""
    if inputs.shape[0] == 6:
        return gradient_to_image(inputs.double().cpu(), weights.double().cpu(), smooth=smooth, alpha_percentile=alpha_percentile)
    from matplotlib import colormaps

    heat = (weights * inputs).sum(dim=0).clamp_min(0)
    rgba = colormaps["inferno"]((heat / heat.max().clamp_min(1e-12)).cpu().numpy())
    rgba[..., 3] = 0.6
    return rgba


def _labels(layout: Layout, n_concepts: int) -> dict[int, str]:
    """latent -> 'concept r=0.83' for the latents whose best ground-truth concept reaches the match threshold."""
    data = json.loads(layout.fact_matching.read_text())
    if not data["concepts"]:
        return {}
    matching = Matching.from_json(data)
    return {latent: label for latent in range(n_concepts) if (label := matching.label(latent)) is not None}


def _name(latent: int, labels: dict[int, str]) -> str:
    return f"latent {latent}" + (f" ({labels[latent]})" if latent in labels else "")


def _show(axis: Any, image: np.ndarray, overlay: np.ndarray | None, title: str, alone: bool = False) -> None:
    """The image, or its input map: `alone` (a B-cos colour map, on white as the authors show them:
    its RGB are the colours the model sees), else over the image (a heat map)."""
    if overlay is None or not alone:
        axis.imshow(image)
    if overlay is not None:
        axis.imshow(overlay)
    axis.set_title(title, fontsize=7)
    axis.axis("off")


def code_weights(grad: Tensor, atoms: Tensor, shown: list[int]) -> Tensor:
    """Weights w (len(shown) + 2, h*w, J) on one image's codes z whose sums sum(z * w) are what its
    maps explain: P_j for each shown latent j, then the logit y_c - b = sum_pj z_pj (d_j . g_p), then
    the other latents' part of it; grad (C, h, w) = g = dy_c/dx̂ (explanation mode), atoms (C, J)."""
    along = (grad.permute(1, 2, 0).reshape(-1, grad.shape[0]) @ atoms).cpu()  # (h*w, J): d_j . g_p
    weight = torch.zeros(len(shown) + 2, along.shape[0], atoms.shape[1], dtype=along.dtype)
    weight[torch.arange(len(shown)), :, torch.tensor(shown, dtype=torch.long)] = 1.0
    others = torch.ones(atoms.shape[1], dtype=along.dtype)
    others[shown] = 0
    weight[-2], weight[-1] = along, along * others
    return weight


class _Renderer:
    """Input maps of one image (or several) for given per-image weightings of the codes, rendered."""

    def __init__(self, backbone: FactBackbone, sae: BiasFreeTopKSAE, settings: FactExplainParams) -> None:
        self.backbone, self.sae, self.settings = backbone, sae, settings
        self.device = next(backbone.model.parameters()).device
        self.alone = any(isinstance(m, AddInverse) for m in backbone.model.modules())  # B-cos input: colour maps

    def render(self, images: np.ndarray, weight: Tensor) -> list[np.ndarray]:
        """Colour maps of explained(codes) = sum(codes * weight[b]) for images (B, H, W, 3), weight (B, h*w, J)."""
        weight = weight.to(self.device)
        inputs, grads = self.backbone.input_weights(
            torch.from_numpy(images).to(self.device), self.sae, lambda codes: (codes * weight).sum(dim=(1, 2))
        )
        return [colour_map(x, w, self.settings.smooth, self.settings.alpha_percentile) for x, w in zip(inputs, grads, strict=True)]

    def presence(self, images: np.ndarray, latents: list[int], positions: int) -> list[np.ndarray]:
        """Maps of latents[b]'s presence P in image b."""
        weight = torch.zeros(len(latents), positions, self.sae.n_concepts)
        weight[torch.arange(len(latents)), :, torch.tensor(latents)] = 1.0
        return self.render(images, weight)


def _check(settings: FactExplainParams, n_classes: int, n_concepts: int, new_head: bool) -> None:
    if settings.smooth > 0 and settings.smooth % 2 == 0:
        raise UserError(f"smooth must be 0 or odd, got {settings.smooth}", key="fact.explain.smooth", fix="e.g. 3")
    if settings.logit is not None and new_head:
        raise UserError("a dataset class's logit, but backbone.new_head maps no class onto the backbone's outputs",
                        key="fact.explain.logit", fix="null (explain the backbone's top output)")
    if settings.logit is not None and settings.logit >= n_classes:
        raise UserError(f"no class {settings.logit} among {n_classes}", key="fact.explain.logit", fix=f"0..{n_classes - 1} or null")
    if settings.concepts is not None and (not settings.concepts or max(settings.concepts) >= n_concepts):
        raise UserError(f"latents {list(settings.concepts)} not all in 0..{n_concepts - 1}", key="fact.explain.concepts",
                        fix=f"a non-empty list of latents below {n_concepts}, or null")


def _top_images(stats: Any, latents: list[int], m: int) -> SelectedImages:
    """Each latent's top m test images by presence (store rows), streamed over the stats store's shards."""
    presence, image_rows = stats[PRESENCE], stats[STATS_IMAGE]
    n = presence.shape[0]
    step = (presence.shards or presence.chunks)[0]
    top = TopImages(min(m, n))
    for start in range(0, n, step):
        span = slice(start, min(start + step, n))
        top.add(torch.from_numpy(presence[span][:, latents]), torch.from_numpy(image_rows[span]))
    return top.result()


def _alive(stats: Any) -> np.ndarray:
    contributions = stats[CONTRIBUTION]
    n, step = contributions.shape[0], (contributions.shards or contributions.chunks)[0]
    alive = np.zeros(contributions.shape[1], dtype=bool)
    for start in range(0, n, step):
        alive |= (contributions[start : start + step] != 0).any(axis=0)
    return alive


def run_fact_explain(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> FactExplainReport:
    """Write the explanation PNGs, gallery.png, the local-and-global PNGs and explanations.json (module doc)."""
    settings = config.fact.explain
    classes = read_dataset_info(layout.dataset_info)["classes"]
    sae, _ = load_sae(layout.fact_sae, device)
    _check(settings, len(classes), sae.n_concepts, config.backbone.new_head)
    backbone = load_fact_backbone(config, layout, device)
    stats = open_store(layout.concept_stats("fact"))
    images = open_store(layout.images)["images"]
    feats_store = open_store(layout.features(backbone.layer))[FEATURES]
    labels = _labels(layout, sae.n_concepts)
    renderer = _Renderer(backbone, sae, settings)
    out_dir = layout.fact_explain
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*out_dir.glob("*.png"), *out_dir.glob("*.json")):  # a run by hand: dvc repro clears the folder itself
        stale.unlink()

    rng = np.random.default_rng(settings.seed)
    n = stats[STATS_IMAGE].shape[0]
    chosen = np.sort(rng.choice(n, size=min(settings.n_images, n), replace=False))
    alive = _alive(stats)
    gallery = list(settings.concepts) if settings.concepts is not None else sorted(
        rng.choice(np.flatnonzero(alive), size=min(settings.gallery_concepts, int(alive.sum())), replace=False).tolist()
    )
    records, local = [], []
    for i in chosen:
        row = int(stats[STATS_IMAGE][i])
        record, shown, maps = _explain_image(backbone, sae, renderer, settings, classes, labels, images[row], feats_store, row, out_dir)
        records.append(record)
        wanted = [j for j in shown if j in gallery] if settings.concepts is not None else shown[:1]
        local += [(row, j, maps[shown.index(j)], record) for j in wanted]
    write_json(out_dir / "explanations.json", records)

    latents = sorted(set(gallery) | {j for _, j, _, _ in local})
    top = _top_images(stats, latents, settings.gallery_images)
    positions = feats_store.shape[2] * feats_store.shape[3]
    strips = {}
    for line, latent in enumerate(latents):
        present = top.presence[line] > 0  # a rare latent's top images run out: no empty maps
        chosen = top.index[line][present].tolist()
        pictures = np.stack([images[r] for r in chosen]) if chosen else np.zeros((0, *images.shape[1:]), np.uint8)
        overlays = renderer.presence(pictures, [latent] * len(chosen), positions) if chosen else []
        strips[latent] = (pictures, overlays, top.presence[line][present].tolist())
    _gallery(out_dir / "gallery.png", gallery, strips, labels, renderer.alone)
    for row, latent, overlay, record in local:
        _local_and_global(out_dir / f"local_row{row}_latent{latent}.png", images[row], overlay, record, latent, strips[latent], labels,
                          renderer.alone)
    return FactExplainReport(out_dir, len(records), gallery)


def _explain_image(
    backbone: FactBackbone, sae: BiasFreeTopKSAE, renderer: _Renderer, settings: FactExplainParams, classes: list[str],
    labels: dict[int, str], picture: np.ndarray, feats_store: Any, row: int, out_dir: Path,
) -> tuple[dict[str, Any], list[int], list[np.ndarray]]:
    """row<index>.png for one image: (its explanations.json record, the shown latents, their maps)."""
    device = renderer.device
    acts = torch.from_numpy(read_rows(feats_store, np.array([row]))).to(device, torch.float32)
    with torch.no_grad():
        _, x_hat = splice(sae, acts)
        predicted, target = backbone.explained_output(backbone.tail(x_hat))
    if settings.logit is not None:
        target = _output_of(backbone, settings.logit, device)
    out = concept_contributions(backbone.tail, sae, acts, target)
    contribution = out.contributions[0].double().cpu()
    explained = float(out.explained[0])
    shown = contribution.topk(min(settings.top_k, len(contribution))).indices.tolist()
    positive = float(contribution.clamp_min(0).sum())
    other = explained - float(contribution[shown].sum())

    maps = renderer.render(np.repeat(picture[None], len(shown) + 2, axis=0), code_weights(out.grad[0], sae.atoms, shown))

    explained_class = int(predicted[0]) if settings.logit is None else settings.logit
    name = classes[explained_class] if explained_class >= 0 else "the backbone's top output"  # -1: backbone.new_head
    figure = Figure(figsize=(1.8 * (len(shown) + 3), 2.3), layout="constrained")  # fits the 3-line titles
    axes = figure.subplots(1, len(shown) + 3)
    predicted_name = classes[int(predicted[0])] if int(predicted[0]) >= 0 else "the backbone's top output"
    _show(axes[0], picture, None, f"row {row}\npredicted {predicted_name}\nexplaining {name}")
    _show(axes[1], picture, maps[-2], f"logit {name}\ny - b = {explained:.3g}", renderer.alone)
    concepts = []
    for axis, latent, overlay in zip(axes[2:-1], shown, maps, strict=False):
        value = float(contribution[latent])
        share = value / positive if positive > 0 else float("nan")
        _show(axis, picture, overlay, f"{_name(latent, labels)}\nC={value:.3g} ({share:.0%} of positive)", renderer.alone)
        concepts.append({"latent": latent, "label": labels.get(latent), "contribution": value, "share": share})
    other_share = other / explained if explained else float("nan")
    _show(axes[-1], picture, maps[-1], f"other concepts\n{other_share:.0%} of y - b", renderer.alone)
    write_figure(out_dir / f"row{row}.png", figure)
    record = {"row": row, "predicted": predicted_name, "explained": name, "explained_logit": explained,
              "positive_total": positive, "concepts": concepts, "other_share": other_share}
    return record, shown, maps[: len(shown)]


def _output_of(backbone: FactBackbone, label: int, device: torch.device) -> Tensor:
    """The backbone output (1,) that dataset class `label` maps onto."""
    return backbone.class_map.output_of(torch.tensor([label], device=device))


Strip = tuple[np.ndarray, list[np.ndarray], list[float]]  # a latent's top images, their maps, their presences


def _gallery(path: Path, latents: list[int], strips: dict[int, Strip], labels: dict[int, str], alone: bool) -> None:
    width = max(1, *(len(strips[j][0]) for j in latents))
    figure = Figure(figsize=(1.6 * width, 1.8 * len(latents)), layout="constrained")
    axes = np.asarray(figure.subplots(len(latents), width, squeeze=False))
    for line, latent in enumerate(latents):
        pictures, overlays, presences = strips[latent]
        for column, axis in enumerate(axes[line]):
            if column < len(pictures):
                _show(axis, pictures[column], overlays[column], f"{_name(latent, labels)}\nP={presences[column]:.3g}", alone)
            else:
                axis.axis("off")
    write_figure(path, figure)


def _local_and_global(
    path: Path, picture: np.ndarray, overlay: np.ndarray, record: dict[str, Any], latent: int, strip: Strip, labels: dict[int, str],
    alone: bool,
) -> None:
    """The local-and-global figure: concept `latent`'s map in this image beside its top images' maps."""
    pictures, overlays, presences = strip
    figure = Figure(figsize=(1.8 * (len(pictures) + 1), 2.3), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(pictures) + 1))
    share = next((c["share"] for c in record["concepts"] if c["latent"] == latent), float("nan"))
    title = f"row {record['row']}: {_name(latent, labels)}\n{share:.0%} of positive ({record['explained']})"
    _show(axes[0], picture, overlay, title, alone)
    for axis, image, image_overlay, value in zip(axes[1:], pictures, overlays, presences, strict=True):
        _show(axis, image, image_overlay, f"top image\nP={value:.3g}", alone)
    write_figure(path, figure)
