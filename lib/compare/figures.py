"""The comparison's figures: one image side by side across methods, and the static index page.

Matplotlib's object API (no pyplot state). Per image: the image and its concepts' true effects on
the backbone's decision (bars), then one row per method with its most-credited concepts, each
drawn as the method's map over the image, titled with the contribution and the true effect.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = ["MethodPanel", "comparison_figure", "index_html"]

TOP_CONCEPTS = 3


@dataclass(frozen=True)
class MethodPanel:
    """What one method says about one image."""

    name: str
    contributions: np.ndarray  # (K,) NaN where unscored
    maps: np.ndarray | None  # (K, H, W) the method's map of each concept (NaN rows: none), or None
    class_map: np.ndarray | None  # (H, W) for methods that have only a class map (CAMs)


def _overlay(ax, image: np.ndarray, heat: np.ndarray | None) -> None:
    ax.imshow(image)
    if heat is not None and np.isfinite(heat).all():
        low, high = float(heat.min()), float(heat.max())
        ax.imshow((heat - low) / (high - low) if high > low else np.zeros_like(heat), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_axis_off()


def comparison_figure(image: np.ndarray, concept_names: Sequence[str], effects: np.ndarray, title: str,
                      panels: Sequence[MethodPanel]) -> Figure:
    """One image (H, W, 3 uint8) across methods; `effects` (K,) its true effects (NaN: absent)."""
    present = np.flatnonzero(np.isfinite(effects))
    order = present[np.argsort(-effects[present])]
    rows = 1 + len(panels)
    fig = Figure(figsize=(2.0 * (TOP_CONCEPTS + 1), 1.9 * rows), layout="constrained")
    axes = fig.subplots(rows, TOP_CONCEPTS + 1, squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(title, fontsize=8, loc="left")  # may run past the small image axis, to the right
    axes[0, 0].set_axis_off()
    bars = fig.add_subplot(axes[0, 1].get_gridspec()[0, 1:])
    for ax in axes[0, 1:]:
        ax.remove()
    bars.barh([concept_names[k] for k in order][::-1], effects[order][::-1],
              color=["tab:blue" if v >= 0 else "tab:red" for v in effects[order][::-1]])
    bars.axvline(0, color="black", linewidth=0.8)
    bars.set_xlabel("true effect Δ on the predicted logit (replace the concept)", fontsize=7)
    bars.tick_params(labelsize=7)
    for row, panel in enumerate(panels, start=1):
        axes[row, 0].text(0.5, 0.5, panel.name, ha="center", va="center", fontsize=10)
        axes[row, 0].set_axis_off()
        scored = np.flatnonzero(np.isfinite(panel.contributions))
        top = scored[np.argsort(-panel.contributions[scored])][:TOP_CONCEPTS]
        for col in range(TOP_CONCEPTS):
            ax = axes[row, col + 1]
            if col >= len(top):
                ax.set_axis_off()
                continue
            k = top[col]
            heat = panel.class_map if panel.maps is None else panel.maps[k]
            _overlay(ax, image, heat)
            truth = "absent" if not np.isfinite(effects[k]) else f"Δ {effects[k]:+.2f}"
            ax.set_title(f"{concept_names[k]}: {panel.contributions[k]:+.2f}\n({truth})", fontsize=7)
    return fig


def index_html(title: str, table_markdown: str, figures: Mapping[str, Sequence[str]]) -> str:
    """A static page: the comparison table and links to the figures (paths relative to the page)."""
    lines = [line for line in table_markdown.strip().splitlines() if not set(line) <= set("|-: ")]
    rows = [[html.escape(cell.strip()) for cell in line.strip().strip("|").split("|")] for line in lines]
    head, body = rows[0], rows[1:]
    table = ["<table>", "<tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"]
    table += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body]
    table.append("</table>")
    sections = []
    for heading, paths in figures.items():
        items = "".join(
            f'<li><a href="{html.escape(p)}"><img src="{html.escape(p)}" width="480" alt="{html.escape(Path(p).stem)}"></a></li>'
            for p in paths
        )
        sections.append(f"<h2>{html.escape(heading)}</h2><ul>{items}</ul>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
            "ul{list-style:none;padding:0}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(table)}{''.join(sections)}</body></html>\n")
