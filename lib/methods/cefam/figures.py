"""CE-FAM's figures of the explained sample (regions_stage: `n_figures` seeded images).

Per image: the explanation (paper Fig. 1: the image, the class Grad-CAM, the top concepts' regions
at their Top-1 layer and their contributions); every layer's candidate map of those concepts with
its association score; the masking curves behind the contributions (Fig. 5b); and, where the
dataset has masks, the IoU curves of each (image, concept) pair that NRA integrates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure


@dataclass(frozen=True)
class ConceptPanel:
    name: str
    layer: str
    score: float  # S^t
    contribution: float
    region: np.ndarray  # (H, W) float, at image size


def explanation_figure(image: np.ndarray, title: str, panels: Sequence[ConceptPanel], class_cam: np.ndarray | None = None) -> Figure:
    """The image, the class Grad-CAM (class_cam (H, W) at image size, if given), one panel per
    concept (region over the image, min-max scaled), and a bar chart of the contributions
    (negative: masking the concept raised the class probability)."""
    n = len(panels)
    extra = class_cam is not None
    figure = Figure(figsize=(2.2 * (n + 2 + extra), 2.6))
    axes = figure.subplots(1, n + 2 + extra)
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=8)
    axes[0].set_axis_off()
    if class_cam is not None:
        _overlay(axes[1], image, class_cam)
        axes[1].set_title("class Grad-CAM", fontsize=8)
    for ax, panel in zip(axes[1 + extra : n + 1 + extra], panels, strict=True):
        _overlay(ax, image, panel.region)
        ax.set_title(f"{panel.name} ({panel.layer})\nS={panel.score:.1f} c={panel.contribution:+.2f}", fontsize=8)
    bars = axes[-1]
    values = [p.contribution for p in panels]
    bars.barh(range(n), values, color=["tab:red" if v >= 0 else "tab:blue" for v in values])
    bars.set_yticks(range(n), [p.name for p in panels], fontsize=8)
    bars.invert_yaxis()
    bars.axvline(0, color="black", linewidth=0.5)
    bars.set_title("contribution", fontsize=8)
    bars.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    return figure


def _overlay(ax, image: np.ndarray, region: np.ndarray) -> None:
    """A map (H, W) at image size, min-max scaled, over the image."""
    region = region - region.min()
    region = region / region.max() if region.max() > 0 else region
    ax.imshow(image)
    ax.imshow(region, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    ax.set_axis_off()


def layer_maps_figure(
    image: np.ndarray, title: str, names: Sequence[str], layers: Sequence[str], maps: np.ndarray, association: np.ndarray
) -> Figure:
    """Every layer's candidate map of each concept with its association score (a row per concept,
    a column per layer; the Top-1 layer's title in red). maps (T, L, H, W) at image size; association (T, L)."""
    t, n_layers = association.shape
    figure = Figure(figsize=(2.0 * (n_layers + 1), 2.1 * max(t, 1)))
    axes = np.asarray(figure.subplots(max(t, 1), n_layers + 1, squeeze=False))
    for row, name in enumerate(names):
        axes[row, 0].imshow(image)
        axes[row, 0].set_axis_off()
        axes[row, 0].set_title(f"{title}\n{name}" if row == 0 else name, fontsize=8)
        top = int(association[row].argmax())
        for col, layer in enumerate(layers):
            ax = axes[row, col + 1]
            _overlay(ax, image, maps[row, col])
            ax.set_title(f"{layer}: a={association[row, col]:.3f}", fontsize=8, color="tab:red" if col == top else "black")
    figure.tight_layout()
    return figure


def masking_curves_figure(
    title: str, names: Sequence[str], layers: Sequence[str], curves: Sequence[np.ndarray], contributions: Sequence[float]
) -> Figure:
    """Paper Fig. 5b: the relative drop of the class score against the share of the concept's top
    channels masked (0..K of K), one line per concept at its Top-1 layer; the area under it is
    the contribution."""
    figure = Figure(figsize=(4.6, 3.2))
    ax = figure.subplots()
    for name, layer, curve, value in zip(names, layers, curves, contributions, strict=True):
        ax.plot(np.linspace(0, 1, len(curve)), curve, marker=".", label=f"{name} ({layer}) c={value:+.3f}")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("share of the top-K channels masked", fontsize=8)
    ax.set_ylabel("relative drop of the class score", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def iou_curves_figure(
    title: str, fractions: np.ndarray, names: Sequence[str], curves: np.ndarray, layers: Sequence[str], low: np.ndarray, ideal: np.ndarray
) -> Figure:
    """IoU_n of the top-n% pixels of each layer's map with the concept's mask against n, one panel
    per (image, concept) pair, with the random (lower) and ideal curves NRA normalises between.
    curves (T, L, F); low, ideal (T, F)."""
    t = max(len(names), 1)
    cols = min(t, 4)
    rows = -(-t // cols)
    figure = Figure(figsize=(3.0 * cols, 2.6 * rows + 0.3))
    axes = np.asarray(figure.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    for ax, name, per_layer, lo, hi in zip(axes, names, curves, low, ideal, strict=False):
        for layer, curve in zip(layers, per_layer, strict=True):
            ax.plot(fractions, curve, label=layer)
        ax.plot(fractions, lo, color="grey", linestyle=":", label="random")
        ax.plot(fractions, hi, color="black", linestyle="--", label="ideal")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("top n of the pixels", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("IoU with the mask", fontsize=8)
    axes[0].legend(fontsize=6)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return figure
