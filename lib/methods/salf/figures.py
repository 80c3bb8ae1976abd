"""SALF-CBM figures (matplotlib, object API: no pyplot global state, safe in batch jobs).

Every function returns a :class:`matplotlib.figure.Figure`; save it with ``fig.savefig(path)``.
Images are (3, H, W) float tensors in [0, 1] (un-normalised RGB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure
from torch import Tensor

if TYPE_CHECKING:
    from lib.methods.salf.glm import ElasticNetPath

__all__ = ["explanation_figure", "gallery_figure", "loss_curve_figure", "path_figure"]


def _rgb(image: Tensor) -> Tensor:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) RGB in [0, 1], got {tuple(image.shape)}")
    return image.detach().to("cpu", torch.float32).clamp(0, 1).permute(1, 2, 0)


def _unit(heatmap: Tensor) -> Tensor:
    """Min-max scale for display; a flat map shows as zeros."""
    low, high = heatmap.min(), heatmap.max()
    return (heatmap - low) / (high - low) if high > low else torch.zeros_like(heatmap)


def explanation_figure(image: Tensor, record: dict, heatmaps: Tensor) -> Figure:
    """One image's explanation: the image, a bar chart of the top concept contributions and a
    heatmap overlay per top concept. `record` is :meth:`Explanations.record`, `heatmaps` (k, H, W)."""
    rgb = _rgb(image)
    concepts = record["concepts"]
    if heatmaps.shape != (len(concepts), *rgb.shape[:2]):
        raise ValueError(
            f"heatmaps must be ({len(concepts)}, {rgb.shape[0]}, {rgb.shape[1]}) to match record and image, "
            f"got {tuple(heatmaps.shape)}"
        )
    k = len(concepts)
    fig = Figure(figsize=(2.2 * max(k, 3), 4.8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    ax_image, ax_bars = top.subplots(1, 2, width_ratios=[1, 2])
    ax_image.imshow(rgb.numpy())
    ax_image.set_axis_off()
    title = f"pred: {record['predicted_name']}"
    if record.get("backbone_predicted_name"):
        title += f" (backbone: {record['backbone_predicted_name']})"
    if record["class"] != record["predicted"]:
        title += f"\nexplained: {record['class_name']}"
    ax_image.set_title(title, fontsize=9)
    names = [c["name"] for c in concepts][::-1]  # largest at the top of the bar chart
    values = [c["contribution"] for c in concepts][::-1]
    ax_bars.barh(names, values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax_bars.axvline(0, color="black", linewidth=0.8)
    ax_bars.set_xlabel(f"contribution to '{record['class_name']}' (logit {record['logit']:.2f})", fontsize=8)
    ax_bars.tick_params(labelsize=8)
    for ax, concept, heatmap in zip(bottom.subplots(1, k, squeeze=False)[0], concepts, heatmaps):
        ax.imshow(rgb.numpy())
        ax.imshow(_unit(heatmap.detach().cpu().float()).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(f"{concept['name']}\n{concept['contribution']:+.2f}", fontsize=8)
        ax.set_axis_off()
    return fig


def gallery_figure(images: Tensor, concept_names: Sequence[str], values: Tensor) -> Figure:
    """Top-activating images per concept: images (C, n, 3, H, W), values (C, n) their c*."""
    if images.ndim != 5 or images.shape[:2] != values.shape or len(concept_names) != images.shape[0]:
        raise ValueError(
            f"need images (C, n, 3, H, W), values (C, n) and C names; got {tuple(images.shape)}, "
            f"{tuple(values.shape)} and {len(concept_names)} names"
        )
    rows, cols = values.shape
    fig = Figure(figsize=(1.6 * cols + 1.2, 1.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        axes[r, 0].set_ylabel(concept_names[r], fontsize=9)
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(_rgb(images[r, c]).numpy())
            ax.set_title(f"{float(values[r, c]):.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def loss_curve_figure(history: dict) -> Figure:
    """Bottleneck training curve: train loss per step and exact val loss, best step marked."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(history["step"], history["train_loss"], label="train (batch)", linewidth=0.8)
    ax.plot(history["val_step"], history["val_loss"], "o-", label="val (exact)", markersize=3)
    ax.axvline(history["best_step"], color="gray", linestyle="--", linewidth=0.8, label="best")
    ax.set_xlabel("step")
    ax.set_ylabel("-cos^3")
    ax.legend(fontsize=8)
    return fig


def path_figure(path: ElasticNetPath, selected: int | None = None) -> Figure:
    """Val accuracy against mean nonzero weights per class along the lambda path."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(path.nonzeros_per_class.numpy(), path.val_acc.numpy(), "o-", markersize=3)
    if selected is not None:
        ax.plot([float(path.nonzeros_per_class[selected])], [float(path.val_acc[selected])], "r*", markersize=12)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("nonzero weights per class")
    ax.set_ylabel("val accuracy")
    return fig
