"""SALF-CBM Table 1's baselines, on the features SALF-CBM reads and with its final layers.

- Standard (sparse), `acc_backbone_sparse`: the final layer on the backbone's own features of the
  bottleneck's layer, average-pooled (the backbone's own head reads the same pooled vector).
- LF-CBM (Oikarinen et al. 2023), `acc_lfcbm_sparse` / `acc_lfcbm_dense`: the non-spatial label-free
  CBM. Its target is the global CLIP similarity of the plain image with each concept (clip_images
  store x concepts store), its bottleneck a linear layer on the pooled features (ConceptBottleneck
  without positions), trained with cbl's loss, early stopping, params and cos^3 filter.

Both read the pooled features from salf/pooled.zarr (N, C) float32, which the sparse stage writes in
its pass over the feature maps: every SAGA epoch reads that instead of the maps.
"""

from __future__ import annotations

import torch
from rich.progress import Progress
from torch import Tensor

from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.progress import progress_callback
from lib.core.schema import IMAGE_EMB, check_compatible
from lib.core.stores import open_store
from lib.methods.salf.cbl import concept_scores, filter_concepts, train_bottleneck
from lib.methods.salf.data import SimilarityTarget, Splits, pair_batches
from lib.methods.salf.final import fit_final_layers
from lib.pipeline.stored_concepts import read_concepts

__all__ = ["POOLED", "run_baselines"]

POOLED = "pooled"  # the array of salf/pooled.zarr


def _as_cell(pooled: Tensor) -> Tensor:
    """Pooled features (B, C) as one-cell maps (B, C, 1, 1), the non-spatial bottleneck's input."""
    return pooled.to(torch.float32)[:, :, None, None]


def run_baselines(
    config: Params, layout: Layout, splits: Splits, n_classes: int, device: torch.device, progress: Progress | None
) -> dict:
    """Fit both baselines on `splits` (train fits, val picks, test scores); their metrics for salf.json."""
    cbl, sparse = config.cbl, config.sparse
    pooled = open_store(layout.salf_pooled)[POOLED]
    labels = open_store(layout.images)["labels"]
    standard = fit_final_layers(
        pooled, labels, splits, n_classes, sparse, device, dense=False, progress=progress, description="backbone lambda path"
    )

    concepts = read_concepts(layout.concepts)
    clip_images = open_store(layout.clip_images)
    check_compatible(clip_images.attrs, concepts.attrs, ("clip_images", "concepts"))
    target = SimilarityTarget(clip_images[IMAGE_EMB], concepts.text_emb)
    stream = dict(device=device, in_memory_mb=cbl.in_memory_mb)
    train = pair_batches(pooled, target, splits.train, cbl.batch_size, _as_cell, shuffle=True, seed=cbl.seed, **stream)
    val = pair_batches(pooled, target, splits.val, cbl.batch_size, _as_cell, **stream)
    model, _ = train_bottleneck(
        train, val, pooled.shape[1], target.n_concepts, None,
        lr=cbl.lr, max_steps=cbl.max_steps, eval_every=cbl.eval_every, patience=cbl.patience, seed=cbl.seed,
        device=device, progress=progress_callback(progress, "LF-CBM bottleneck", cbl.max_steps, "val_loss"),
    )
    kept, keep = filter_concepts(model, concept_scores(model, val).cpu(), cbl.cos3_threshold)
    kept.requires_grad_(False)  # a fixed map from here on: no autograd graphs in the SAGA epochs
    lfcbm = fit_final_layers(
        pooled, labels, splits, n_classes, sparse, device,
        transform=lambda block: kept.project(_as_cell(block)).flatten(1), progress=progress, description="LF-CBM lambda path",
    )
    return {
        "acc_backbone_sparse": standard.acc_sparse,
        "nonzero_per_class_backbone_sparse": standard.nonzero_per_class,
        "acc_lfcbm_sparse": lfcbm.acc_sparse,
        "acc_lfcbm_dense": lfcbm.acc_dense,
        "nonzero_per_class_lfcbm_sparse": lfcbm.nonzero_per_class,
        "n_concepts_lfcbm": int(keep.numel()),
    }
