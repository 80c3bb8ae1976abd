"""One method's concept statistics: a dask reduction over its concept_stats store (lib/core/schema.py).

The store's arrays are read as dask arrays with one chunk per shard (lib.core.stores.dask_view).
Each shard's blocks go to one task that turns them into `ShardSums` (counts and sums of size J,
K x J and top-k x J; K classes, J concepts) and drops them; the sums are merged in a tree. So
memory holds a few shards and a few sums whatever the number of images, and the same graph runs on
local threads or on a dask.distributed cluster. (Separate dask reductions for each statistic would
read every shard once for all of them too, but dask then keeps loaded shards in memory until the
last of those reductions has passed them: measured, memory grew with the number of shards.)

The definitions follow FaCT's analysis (m-parchami/FaCT, fact/analysis/analysis.py); README
"Concept statistics" says where they differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import zarr
from dask.delayed import Delayed

from lib.core.errors import UserError
from lib.core.schema import CONTRIBUTION, PRED_BACKBONE, PRED_MODEL, PRESENCE, STATS_IMAGE, STATS_LABEL
from lib.core.stores import dask_view, open_store
from lib.metrics.concepts import poscover

__all__ = ["ALWAYS_ON", "COVER", "ConceptStatistics", "ShardSums", "concept_statistics", "open_concept_stats"]

ALWAYS_ON = 0.85  # a concept present in more than this share of images is "always on" (FaCT)
COVER = 0.8  # PosCover-80: concepts needed for 80% of an image's positive contribution (FaCT)
FAN_IN = 4  # sums merged per task: the tree holds about FAN_IN + threads sums at a time
PER_IMAGE = (STATS_IMAGE, STATS_LABEL, PRED_BACKBONE, PRED_MODEL)


@dataclass(frozen=True)
class ConceptStatistics:
    """A method's statistics: `metrics` (numbers for metrics/stats.json) and three tables."""

    metrics: dict[str, float | int | None]
    concepts: pd.DataFrame  # one row per concept: rates, means, alive, always_on
    per_class: pd.DataFrame  # (class, concept) mean contribution over the images predicted as the class; zeros left out
    top_images: pd.DataFrame  # per concept its top_k images by presence
    coverage: pd.DataFrame  # FaCT's coverage curve: per rank r, mean and std (%) of the top r concepts' positive share


@dataclass(frozen=True)
class ShardSums:
    """What a run of images adds to the statistics; `merge` gives the sums over several runs."""

    n: int  # images
    backbone_right: int  # images the backbone predicts right
    model_right: int  # ... the concept model predicts right
    agree: int  # ... where both predict the same class
    backbone_predicts: int  # images with a backbone prediction (pred_backbone >= 0)
    nonzero: int  # nonzero contributions, summed over images
    cover_sum: float  # PosCover summed over the images with some positive contribution
    covered: int  # images with some positive contribution
    classes: tuple[int, int]  # smallest and largest class id seen
    present: np.ndarray  # (J,) images with presence > 0
    contributing: np.ndarray  # (J,) images with a nonzero contribution
    presence_sum: np.ndarray  # (J,) float64
    contribution_sum: np.ndarray  # (J,) float64
    class_count: np.ndarray  # (K,) images predicted as each class
    class_sum: np.ndarray  # (K, J) float64 contributions summed over the images predicted as each class
    top_presence: np.ndarray  # (<= k, J) largest presence per concept, largest first
    top_row: np.ndarray  # (<= k, J) store rows of top_presence
    positive_share: np.ndarray  # (J,) float64 each concept's share of the image's positive contribution, summed over covered images
    curve_sum: np.ndarray  # (J,) float64 share of the r largest positive contributions, summed over covered images
    curve_sq: np.ndarray  # (J,) float64 ... of its squares

    @classmethod
    def of(cls, presence: np.ndarray, contribution: np.ndarray, label: np.ndarray, pred_backbone: np.ndarray,
           pred_model: np.ndarray, *, start: int, n_classes: int, top_k: int) -> ShardSums:
        """The sums of one block of rows start, start + 1, ... (presence and contribution (B, J))."""
        nonzero = contribution != 0
        cover = poscover(contribution, COVER)
        onehot = (pred_model[:, None] == np.arange(n_classes)).astype(np.float64)
        top = np.argsort(-presence, axis=0, kind="stable")[:top_k]  # ties: the earlier row first
        positive = np.maximum(contribution.astype(np.float64), 0)
        total = positive.sum(axis=1, keepdims=True)
        share = positive[total[:, 0] > 0] / total[total[:, 0] > 0]  # covered images only (FaCT's 0/0 is NaN)
        curve = np.cumsum(-np.sort(-share, axis=1), axis=1)
        return cls(
            n=len(label),
            backbone_right=int((pred_backbone == label).sum()),
            model_right=int((pred_model == label).sum()),
            agree=int((pred_model == pred_backbone).sum()),
            backbone_predicts=int((pred_backbone >= 0).sum()),
            nonzero=int(nonzero.sum()),
            cover_sum=float(np.nansum(cover)),
            covered=int((~np.isnan(cover)).sum()),
            classes=(int(min(label.min(), pred_model.min())), int(max(label.max(), pred_model.max(), pred_backbone.max()))),
            present=(presence > 0).sum(axis=0),
            contributing=nonzero.sum(axis=0),
            presence_sum=presence.sum(axis=0, dtype=np.float64),
            contribution_sum=contribution.sum(axis=0, dtype=np.float64),
            class_count=onehot.sum(axis=0).astype(np.int64),
            class_sum=onehot.T @ contribution.astype(np.float64),
            top_presence=np.take_along_axis(presence, top, axis=0),
            top_row=top + start,
            positive_share=share.sum(axis=0),
            curve_sum=curve.sum(axis=0),
            curve_sq=np.square(curve).sum(axis=0),
        )

    @staticmethod
    def merge(*parts: ShardSums, top_k: int) -> ShardSums:
        """The sums over all `parts` (given in row order, so ties keep the earlier row first)."""
        values = np.concatenate([p.top_presence for p in parts])
        top = np.argsort(-values, axis=0, kind="stable")[:top_k]
        total = {
            name: sum(getattr(p, name) for p in parts)
            for name in ("n", "backbone_right", "model_right", "agree", "backbone_predicts", "nonzero", "cover_sum", "covered",
                         "present", "contributing", "presence_sum", "contribution_sum", "class_count", "class_sum",
                         "positive_share", "curve_sum", "curve_sq")
        }
        return ShardSums(
            **total,
            classes=(min(p.classes[0] for p in parts), max(p.classes[1] for p in parts)),
            top_presence=np.take_along_axis(values, top, axis=0),
            top_row=np.take_along_axis(np.concatenate([p.top_row for p in parts]), top, axis=0),
        )


def open_concept_stats(path: Path) -> zarr.Group:
    """Open a finished concept_stats store and check it has the contract's arrays, shapes and concept names."""
    group = open_store(path)
    missing = [name for name in (*PER_IMAGE, PRESENCE, CONTRIBUTION) if name not in group]
    if missing:
        raise UserError(f"{path}: no arrays {missing} (lib/core/schema.py lists them)", fix="rerun the stage that writes it")
    n, j = group[CONTRIBUTION].shape
    names = group.attrs.get("concepts")
    shapes = {name: group[name].shape for name in (*PER_IMAGE, PRESENCE)}
    if n == 0 or any(shape != ((n, j) if name == PRESENCE else (n,)) for name, shape in shapes.items()) or len(names or ()) != j:
        raise UserError(
            f"{path}: arrays {shapes} and {len(names or ())} concept names do not fit contribution {(n, j)}",
            fix="rerun the stage that writes it",
        )
    return group


def shard_sums(group: zarr.Group, n_classes: int, top_k: int) -> Delayed:
    """The lazy ShardSums of the whole store: one task per shard (the dask chunks of its arrays,
    whole rows across all concepts), merged FAN_IN at a time."""
    arrays = [dask_view(group[name]).rechunk({1: -1}) for name in (PRESENCE, CONTRIBUTION)]
    arrays += [dask_view(group[name]) for name in (STATS_LABEL, PRED_BACKBONE, PRED_MODEL)]
    arrays = [a.rechunk({0: arrays[0].chunks[0]}) for a in arrays]  # one row layout, whatever each array's shards
    starts = np.cumsum((0, *arrays[0].chunks[0][:-1]))
    blocks = zip(*(a.to_delayed().ravel() for a in arrays))
    level = [
        dask.delayed(ShardSums.of)(*block, start=int(start), n_classes=n_classes, top_k=top_k)
        for block, start in zip(blocks, starts)
    ]
    while len(level) > 1:
        level = [dask.delayed(ShardSums.merge)(*level[i : i + FAN_IN], top_k=top_k) for i in range(0, len(level), FAN_IN)]
    return level[0]


def concept_statistics(group: zarr.Group, classes: Sequence[str], top_k: int, scheduler: Any = "threads") -> ConceptStatistics:
    """Reduce a concept_stats store (open_concept_stats) with dask; `scheduler` is dask.compute's
    (e.g. "threads" or a dask.distributed Client). `classes`: class names, indexed by class id."""
    (sums,) = dask.compute(shard_sums(group, len(classes), top_k), scheduler=scheduler)
    if sums.classes[0] < 0 or sums.classes[1] >= len(classes):
        raise UserError(
            f"class ids {sums.classes[0]}..{sums.classes[1]} in the store, but the dataset has {len(classes)} classes",
            fix="rerun the stage that writes the store after prepare",
        )
    n = sums.n
    concepts = pd.DataFrame({
        "concept_id": np.arange(len(sums.present)),
        "concept": pd.Categorical(group.attrs["concepts"]),
        "present_rate": sums.present / n,
        "contributing_rate": sums.contributing / n,
        "mean_presence": sums.presence_sum / n,
        "mean_contribution": sums.contribution_sum / n,
        "alive": sums.contributing > 0,
        "always_on": sums.present / n > ALWAYS_ON,
    })
    backbone = sums.backbone_predicts > 0  # none with backbone.new_head
    metrics = {
        "n_images": n,
        "n_concepts": len(concepts),
        "acc_backbone": sums.backbone_right / n if backbone else None,
        "acc_model": sums.model_right / n,
        "agreement": sums.agree / n if backbone else None,  # share of images where both predict the same class
        "l0": sums.nonzero / n,
        "alive_pct": 100 * float(concepts["alive"].mean()),
        "always_on": int(concepts["always_on"].sum()),
        # FaCT's "together contrib": the always-on concepts' mean share (%) of an image's positive contribution
        "always_on_share_pct": 100 * float(sums.positive_share[concepts["always_on"].to_numpy()].sum()) / sums.covered
        if sums.covered else None,
        "poscover80": sums.cover_sum / sums.covered if sums.covered else None,
        "no_positive_pct": 100 * (1 - sums.covered / n),
    }
    return ConceptStatistics(metrics, concepts, _per_class(sums, concepts, classes), _top_images(group, sums, concepts), _coverage(sums))


def _coverage(sums: ShardSums) -> pd.DataFrame:
    """FaCT's coverage curve (analysis.py's coverage_cumsum): per rank r = 1..J the mean and std (unbiased,
    as torch.std_mean) over the images with a positive contribution of the share (%) of that positive
    contribution the r largest give."""
    n = sums.covered
    mean = sums.curve_sum / n if n else np.full(len(sums.curve_sum), np.nan)
    variance = (sums.curve_sq - n * np.square(mean)) / (n - 1) if n > 1 else np.full(len(mean), np.nan)
    return pd.DataFrame({"rank": np.arange(1, len(mean) + 1), "mean_pct": 100 * mean,
                         "std_pct": 100 * np.sqrt(np.maximum(variance, 0))})


def _per_class(sums: ShardSums, concepts: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Long table of the nonzero per-class mean contributions (classes no image is predicted as have none)."""
    count = sums.class_count
    mean = np.divide(sums.class_sum, count[:, None], out=np.zeros_like(sums.class_sum), where=count[:, None] > 0)
    class_id, concept_id = np.nonzero(mean)
    return pd.DataFrame({
        "class_id": class_id,
        "class": pd.Categorical.from_codes(class_id, categories=list(classes)),
        "concept_id": concept_id,
        "concept": concepts["concept"].array[concept_id],
        "n_images": count[class_id],
        "mean_contribution": mean[class_id, concept_id],
    })


def _top_images(group: zarr.Group, sums: ShardSums, concepts: pd.DataFrame) -> pd.DataFrame:
    """Per concept its top images by presence, with their image rows, labels and predictions."""
    rows = sums.top_row  # (k, J) store positions, largest presence first
    unique = np.unique(rows)
    per_image = {name: group[name].get_orthogonal_selection((unique,)) for name in (STATS_IMAGE, STATS_LABEL, PRED_MODEL)}
    at = np.searchsorted(unique, rows.T.ravel())  # concept-major: concept 0's k images, then concept 1's, ...
    k, j = rows.shape
    concept_id = np.repeat(np.arange(j), k)
    return pd.DataFrame({
        "concept_id": concept_id,
        "concept": concepts["concept"].array[concept_id],
        "rank": np.tile(np.arange(k), j),
        "image": per_image[STATS_IMAGE][at],
        "presence": sums.top_presence.T.ravel(),
        "label": per_image[STATS_LABEL][at],
        "pred_model": per_image[PRED_MODEL][at],
    })
