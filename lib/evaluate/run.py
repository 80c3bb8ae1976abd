"""The evaluate stage's work: every available method's maps against the ground-truth masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import zarr
from rich.progress import Progress

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import EvaluateParams, Params
from lib.core.skipped import no_masks
from lib.core.stores import open_store
from lib.core.streams import batch_source
from lib.data.manifest import read_dataset_info, read_manifest, split_indices
from lib.evaluate.adapters import METHODS
from lib.evaluate.registry import ConceptMapMethod, EvalBatch, EvalContext, build_methods
from lib.evaluate.scoring import ConceptMapScores, CurveMean, SegmentationScores, reference_curves
from lib.evaluate.truth import GroundTruth
from lib.metrics.spatial import cefam_fractions

# reference curves of the IoU plot, beside the methods' own curves (scoring.reference_curves)
CHANCE, IDEAL, CEFAM_LOWER = "chance", "ideal", "cefam_lower"
IOU_COLUMNS = ["method", "top_percent", "iou"]  # the IoU plot's data (metrics/plots/iou_curves.csv)


@dataclass
class Evaluation:
    """Scores of every method, and the plot data."""

    n_images: int
    concept_maps: dict[str, dict[str, dict[str, float]]]  # method -> {"avg" | TYPE: {ConceptMapScores.keys}}
    segmentation: dict[str, dict[str, float]]  # method -> {"pixel_acc", "miou", "map"}
    iou_curves: pd.DataFrame  # columns method, top_percent, iou
    accuracy_path: pd.DataFrame  # columns method, nonzeros_per_class, accuracy
    skipped: list[str] = field(default_factory=list)  # registered methods whose outputs do not exist yet
    unscored: str | None = None  # why no map was scored (data without ground-truth masks); None: they were


def evaluate_methods(
    methods: Sequence[ConceptMapMethod],
    images: zarr.Group,
    masks: zarr.Array,
    indices: np.ndarray,
    truth: GroundTruth,
    params: EvaluateParams,
    device: torch.device,
    progress: Progress | None = None,
) -> Evaluation:
    """Score `methods` on the store rows `indices`, streaming batches of images and masks.

    images: the image store group (arrays images (N, H, W, 3) uint8, labels (N,)); masks: the
    concept masks (N, K, H, W) uint8 (the masks array of images.zarr). One pass over the data serves every method.
    The top-n grid is CE-FAM's (spatial.cefam_fractions): `params.steps` points from 0 to 100 %,
    refined to single pixels in the first step, where a step would be coarser than a small mask.
    """
    if masks.shape[1] != truth.n_concepts:
        raise ValueError(f"images.zarr masks have {masks.shape[1]} concept channels but dataset.json lists {truth.n_concepts} concepts")
    if not len(indices):
        raise UserError("the dataset has no images in this split", key="evaluate.split", value=params.split,
                        fix="choose a split that has images (data.*.test_fraction sets the test share)")
    fractions = cefam_fractions(masks.shape[2] * masks.shape[3], bins=params.steps - 1)
    concept_scores = {m.name: ConceptMapScores(truth.concept_types, fractions, params.hit_threshold, params.protocol) for m in methods}
    segmentation = {m.name: SegmentationScores() for m in methods}
    references = {name: CurveMean() for name in (CHANCE, IDEAL, CEFAM_LOWER)}
    source = batch_source(
        {"images": images["images"], "labels": images["labels"], "masks": masks}, indices, params.batch_size, device=device
    )
    task = progress.add_task("evaluate", total=len(indices)) if progress is not None else None
    for rows in source():
        batch = EvalBatch(rows["index"], rows["images"], rows["labels"])
        gt = rows["masks"].bool()
        for name, curve in reference_curves(gt, fractions).items():
            references[name].add(curve)
        targets = truth.class_masks(gt, batch.labels)
        # methods choose their own grad mode: CAM-style maps (Grad-CAM, CE-FAM regions) need gradients
        for method in methods:
            maps = method.concept_maps(batch)
            if maps is not None:
                concept_scores[method.name].add(maps.maps.detach(), maps.concepts, gt, maps.sources, maps.source_names)
            class_maps = method.class_maps(batch)
            if class_maps is not None:
                segmentation[method.name].add(class_maps.detach(), targets)
        if progress is not None:
            progress.advance(task, len(batch.index))

    curves = [(name, r.mean()) for name, r in references.items()] + [(name, s.curve.mean()) for name, s in concept_scores.items()]
    percent = (fractions * 100).tolist()
    iou = pd.DataFrame(
        [(name, p, v) for name, curve in curves if curve is not None for p, v in zip(percent, curve.tolist(), strict=True)],
        columns=IOU_COLUMNS,
    )
    return Evaluation(
        n_images=len(indices),
        concept_maps={name: s.summary() for name, s in concept_scores.items() if s.n_pairs},
        segmentation={name: s.summary() for name, s in segmentation.items() if s.n_images},
        iou_curves=iou,
        accuracy_path=accuracy_paths(methods),
    )


def accuracy_paths(methods: Sequence[ConceptMapMethod]) -> pd.DataFrame:
    """The sparse methods' (nonzero weights per class, accuracy) paths: columns method, nonzeros_per_class, accuracy."""
    return pd.DataFrame(
        [(m.name, float(nnz), float(acc)) for m in methods for nnz, acc in (m.accuracy_path() or [])],
        columns=["method", "nonzeros_per_class", "accuracy"],
    )


def evaluate_all(params: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> Evaluation:
    """Build every method of the adapters' table whose inputs exist and evaluate it on `evaluate.split`.

    On data without ground-truth masks no map is scored (`Evaluation.unscored` says why); the
    methods' accuracy paths, which need no masks, are kept."""
    info = read_dataset_info(layout.dataset_info)
    unscored = no_masks(info["kind"])
    if unscored:
        truth = GroundTruth.without_concepts(info["classes"])
        methods, skipped = build_methods(EvalContext(params, layout, device, truth), METHODS)
        return Evaluation(0, {}, {}, pd.DataFrame(columns=IOU_COLUMNS), accuracy_paths(methods), skipped, unscored)
    store = open_store(layout.images)
    truth = GroundTruth.from_info(info)
    indices = split_indices(read_manifest(layout.manifest), params.evaluate.split)
    if params.evaluate.max_images is not None:
        indices = indices[: params.evaluate.max_images]
    methods, skipped = build_methods(EvalContext(params, layout, device, truth), METHODS)
    evaluation = evaluate_methods(methods, store, store["masks"], indices, truth, params.evaluate, device, progress)
    evaluation.skipped = skipped
    return evaluation
