"""CE-FAM explanation figures (paper Fig. 1): an image, its predicted class, and its top concepts
with their regions (Top-1 layer) and contributions."""

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


def explanation_figure(image: np.ndarray, title: str, panels: Sequence[ConceptPanel]) -> Figure:
    """The image, one panel per concept (region over the image, min-max scaled), and a bar chart of
    the contributions (negative: masking the concept raised the class probability)."""
    n = len(panels)
    figure = Figure(figsize=(2.2 * (n + 2), 2.6))
    axes = figure.subplots(1, n + 2)
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=8)
    for ax, panel in zip(axes[1 : n + 1], panels, strict=True):
        region = panel.region - panel.region.min()
        region = region / region.max() if region.max() > 0 else region
        ax.imshow(image)
        ax.imshow(region, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(f"{panel.name} ({panel.layer})\nS={panel.score:.1f} c={panel.contribution:+.2f}", fontsize=8)
    for ax in axes[: n + 1]:
        ax.set_axis_off()
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
