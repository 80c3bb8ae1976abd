"""Preview grids of sample images, with concept masks outlined when they are known."""

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # Figure + savefig uses Agg without touching pyplot state
from matplotlib.lines import Line2D
from scipy.ndimage import distance_transform_edt

from lib.toy.world import CONCEPT_TYPES, CONCEPTS

# One outline colour and ring offset (image pixels outside the mask edge) per concept type. Masks
# of different types often share an edge (an object's colour, shape and pattern masks are the
# same pixels, the background mask is their complement), so each type gets its own concentric
# ring instead of all outlines being drawn on top of each other.
_TYPE_STYLE: dict[str, tuple[str, float]] = {
    "background": ("#ffffff", 0.0),
    "color": ("#00e5ff", 0.75),
    "shape": ("#ff9f1c", 1.5),
    "pattern": ("#ff3df2", 2.25),
    "concept": ("#ffee00", 0.0),  # names outside the toy vocabulary
}
_LINE_WIDTH = 1.1
_TYPE_OF = {c.name: c.type for c in CONCEPTS}
_UPSAMPLE = 4  # contour an upsampled mask so outlines follow pixel edges, not pixel centres


def _check_inputs(
    images: np.ndarray, labels: np.ndarray, masks: np.ndarray | None, concept_names: list[str] | None, n: int
) -> None:
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if masks is None:
        return
    if masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[1:3]:
        raise ValueError(f"masks must have shape (N, K, H, W) = ({images.shape[0]}, K, {images.shape[1]}, "
                         f"{images.shape[2]}), got {masks.shape}")
    if concept_names is not None and len(concept_names) != masks.shape[1]:
        raise ValueError(f"concept_names must have {masks.shape[1]} entries (one per mask), got {len(concept_names)}")


def _outline(ax: Axes, mask: np.ndarray, kind: str) -> None:
    """Draw the ring around a boolean (H, W) mask in the colour and at the offset of its type."""
    big = np.kron(mask, np.ones((_UPSAMPLE, _UPSAMPLE), bool))
    # Signed distance to the mask edge in image pixels (> 0 outside), so a ring at any offset is
    # one contour level and follows pixel edges rather than pixel centres.
    signed = (distance_transform_edt(~big) - distance_transform_edt(big)) / _UPSAMPLE
    # Upsampled pixel centres in the image's pixel coordinates (imshow puts pixel centres at integers).
    ys = (np.arange(big.shape[0]) + 0.5) / _UPSAMPLE - 0.5
    xs = (np.arange(big.shape[1]) + 0.5) / _UPSAMPLE - 0.5
    colour, offset = _TYPE_STYLE[kind]
    ax.contour(xs, ys, signed, levels=[offset], colors=[colour], linewidths=_LINE_WIDTH)


def save_preview(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    masks: np.ndarray | None = None,
    concept_names: list[str] | tuple[str, ...] | None = None,
    n: int = 16,
) -> None:
    """Save a PNG grid of the first `n` images titled with their class name.

    With `masks` (bool (N, K, H, W)) every non-empty concept mask is outlined in its type's colour
    (legend below the grid) and the present concepts are listed under each image.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    _check_inputs(images, labels, masks, concept_names, n)
    count = min(n, len(images))
    names = list(concept_names) if concept_names is not None else (
        [f"concept {k}" for k in range(masks.shape[1])] if masks is not None else [])
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    caption_room = 0.55 if masks is not None else 0.0
    fig = Figure(figsize=(2.6 * cols, (2.8 + caption_room) * rows + 0.4 * (masks is not None)))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.axis("off")
    for i, ax in enumerate(axes[:count]):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(class_names[int(labels[i])]), fontsize=9, fontweight="bold")
        if masks is None:
            continue
        present = np.flatnonzero(masks[i].any(axis=(1, 2)))
        for k in present:
            _outline(ax, masks[i, k], _TYPE_OF.get(names[k], "concept"))
        ax.set_xlabel(textwrap.fill(", ".join(names[k] for k in present), 40), fontsize=7)
    if masks is not None:
        used = [t for t in (*CONCEPT_TYPES, "concept") if t in {_TYPE_OF.get(name, "concept") for name in names}]
        handles = [Line2D([], [], color=_TYPE_STYLE[t][0], linewidth=3) for t in used]
        legend = fig.legend(handles, used, loc="lower center", fontsize=8,
                            ncol=len(used) if cols > 1 else 2,  # a one-image grid is too narrow for one row
                            facecolor="#444444", labelcolor="white", framealpha=1)
        legend.get_frame().set_edgecolor("none")
    fig.tight_layout(rect=(0, 0.04 if masks is not None else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
