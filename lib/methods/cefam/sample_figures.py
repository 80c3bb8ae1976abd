"""The regions stage's figures of the explained sample: `cefam.regions.n_figures` seeded images of
evaluate.split, each explained by up to `figure_concepts` concepts (those with a contribution, by
|contribution|), into data/<name>/cefam/explain/:

* ``row<i>.png`` — the image, the class Grad-CAM, the concepts' regions at their Top-1 layer and
  their contributions (paper Fig. 1);

and for the first `figure_details` of those images (matplotlib's drawing is most of the cost):

* ``row<i>_layers.png`` — every explained layer's candidate map of those concepts with its
  association score (the Top-1 layer in red);
* ``row<i>_masking.png`` — the masking curves whose areas are the contributions (Fig. 5b);
* ``row<i>_iou.png`` — where the dataset has masks, per (image, concept) pair of a ground-truth
  concept present in the image: IoU of each layer's top-n% pixels with the mask against n, with
  the random and ideal curves NRA normalises between.

The maps, scores and contributions are read from the stores; the class Grad-CAM and the masking
curves are recomputed for the sample (`details`: explain.explain_details), a few backward passes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lib.core.layout import Layout
from lib.core.outputs import write_figure
from lib.core.params import Params
from lib.core.schema import CONTRIBUTION, PRED_BACKBONE, PRESENCE, STATS_LABEL
from lib.core.stores import open_store
from lib.data.manifest import read_dataset_info
from lib.methods.cefam.artifacts import REGION_ASSOCIATION, map_array
from lib.methods.cefam.explain import FigureDetails
from lib.methods.cefam.figures import ConceptPanel, explanation_figure, iou_curves_figure, layer_maps_figure, masking_curves_figure
from lib.metrics.spatial import cefam_fractions, ideal_iou_curve, iou_curve, random_iou_curve

__all__ = ["Details", "write_sample_figures"]

# (image uint8 (H, W, 3), concepts (T,), their Top-1 layers (T,) as indices into the explained layers) -> details
Details = Callable[[np.ndarray, np.ndarray, np.ndarray], FigureDetails]


def _at_image_size(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps (..., h, w) upsampled bilinearly to `size`, as evaluate's cefam adapter does."""
    lead = maps.shape[:-2]
    flat = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)).reshape(-1, 1, *maps.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size).numpy()


def _layer_maps(regions, layers: Sequence[str], position: int, concepts: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Every layer's maps of `concepts` for the image at store position `position`, at image size: (T, L, H, W)."""
    return np.stack([_at_image_size(regions[map_array(layer)][position, concepts], size) for layer in layers], axis=1)


def write_sample_figures(
    layout: Layout, config: Params, rows: np.ndarray, names: Sequence[str], layers: Sequence[str], details: Details
) -> int:
    """Write the PNGs of the sample (old ones removed first); return the number of images."""
    settings = config.cefam.regions
    out = layout.cefam_explain
    if out.exists():
        shutil.rmtree(out)
    if settings.n_figures == 0:
        return 0
    regions, stats = open_store(layout.cefam_regions), open_store(layout.concept_stats("cefam"))
    image_store = open_store(layout.images)
    images = image_store["images"]
    masks = image_store["masks"] if "masks" in image_store else None
    info = read_dataset_info(layout.dataset_info)
    classes = info["classes"]
    truth = {c["name"]: k for k, c in enumerate(info.get("concepts") or [])}  # ground-truth concept ids by name
    chosen = np.sort(np.random.default_rng(settings.seed).choice(len(rows), size=min(settings.n_figures, len(rows)), replace=False))
    for number, position in enumerate(chosen.tolist()):
        row = int(rows[position])
        image = images[row]
        size = image.shape[:2]
        contribution, presence = stats[CONTRIBUTION][position], stats[PRESENCE][position]
        association = regions[REGION_ASSOCIATION][position]  # (M, L)
        best = association.argmax(axis=1)
        computed = np.flatnonzero(contribution != 0)
        order = computed[np.argsort(-np.abs(contribution[computed]))][: settings.figure_concepts]
        maps = _layer_maps(regions, layers, position, order, size)  # (T, L, H, W)
        extra = details(image, order, best[order])
        pred, label = int(stats[PRED_BACKBONE][position]), int(stats[STATS_LABEL][position])
        title = f"row {row}: pred {classes[pred]}\n(true {classes[label]})"
        panels = [
            ConceptPanel(names[t], layers[best[t]], float(presence[t]), float(contribution[t]), maps[i, best[t]])
            for i, t in enumerate(order.tolist())
        ]
        cam = _at_image_size(extra.class_cam.cpu().numpy(), size)
        write_figure(out / f"row{row}.png", explanation_figure(image, title, panels, class_cam=cam))
        if number >= settings.figure_details:
            continue
        concept_names = [names[t] for t in order.tolist()]
        write_figure(out / f"row{row}_layers.png", layer_maps_figure(image, f"row {row}", concept_names, layers, maps, association[order]))
        write_figure(out / f"row{row}_masking.png", masking_curves_figure(
            f"row {row}: masking at the Top-1 layer ({classes[pred]})", concept_names, [layers[best[t]] for t in order.tolist()],
            [c.cpu().numpy() for c in extra.class_curves], [float(contribution[t]) for t in order.tolist()],
        ))
        if masks is not None:
            _iou_figure(out / f"row{row}_iou.png", f"row {row}", masks[row], truth, names, layers, regions, position, size)
    return len(chosen)


def _iou_figure(path, title: str, image_masks: np.ndarray, truth: dict[str, int], names, layers, regions, position: int, size) -> None:
    """The IoU curves of the image's ground-truth concepts that are present (nonempty mask) and in the list."""
    pairs = [(t, truth[name]) for t, name in enumerate(names) if name in truth and image_masks[truth[name]].any()]
    if not pairs:
        return
    columns = np.array([t for t, _ in pairs])
    gt = torch.from_numpy(np.stack([image_masks[k] for _, k in pairs]).astype(bool))  # (T, H, W)
    maps = torch.from_numpy(_layer_maps(regions, layers, position, columns, size))  # (T, L, H, W)
    fractions = cefam_fractions(size[0] * size[1])
    curves = torch.stack([iou_curve(maps[:, j].double(), gt, fractions) for j in range(len(layers))], dim=1)
    write_figure(path, iou_curves_figure(
        title, fractions.numpy(), [names[t] for t, _ in pairs], curves.numpy(), layers,
        random_iou_curve(gt, fractions).numpy(), ideal_iou_curve(gt, fractions).numpy(),
    ))
