"""The C²-Score of FaCT's concepts on the test split: FaCT's input-level maps of each latent's presence
(FactBackbone.input_maps: B-cos dynamic linear contributions, else gradient x input), encoded with
the configured featurizer (lib/methods/fact/featurizers.py), scored by lib/methods/fact/c2.py (the
authors' definition). The concepts' top images come streamed from the contributions pass (TopImages).
"""

from __future__ import annotations

import numpy as np
import torch
from rich.progress import Progress

from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.stores import open_store
from lib.methods.fact.backbone import FactBackbone
from lib.methods.fact.c2 import C2Result, TopImages, c2_scores, select_concept_images, selection_depth
from lib.methods.fact.featurizers import Featurizer, read_any
from lib.methods.fact.sae import BiasFreeTopKSAE

__all__ = ["fact_c2", "top_images"]


def top_images(config: Params, n_images: int) -> TopImages:
    """The stream of top presences the C² selection needs, for n_images evaluated images."""
    return TopImages(selection_depth(n_images, config.fact.c2.top_fraction, config.fact.c2.min_images))


def fact_c2(
    config: Params, layout: Layout, backbone: FactBackbone, sae: BiasFreeTopKSAE, featurizer: Featurizer, rows: np.ndarray,
    top: TopImages, progress: Progress | None = None,
) -> C2Result:
    """C² of every latent that has at least fact.c2.min_count images (or a seeded sample of
    fact.c2.max_concepts of them) over the test images `rows`, encoded with `featurizer`
    (featurizers.load_featurizer: load it before any work, it checks its data)."""
    settings = config.fact.c2
    device = next(backbone.model.parameters()).device
    selection = select_concept_images(top.result(), top.n_positive, settings.top_fraction, settings.min_images, settings.min_count)
    if settings.max_concepts is not None and len(selection) > settings.max_concepts:
        pick = torch.randperm(len(selection), generator=torch.Generator().manual_seed(config.fact.seed))[: settings.max_concepts]
        selection = [selection[i] for i in sorted(pick.tolist())]
    images = open_store(layout.images)["images"]

    def maps(image_rows: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        pixels = torch.from_numpy(read_any(images, image_rows.numpy())).to(device)
        return backbone.input_maps(pixels, sae, concepts.to(device))

    return c2_scores(
        selection, torch.from_numpy(rows), maps, featurizer, tuple(images.shape[1:3]),
        mean_min_images=settings.mean_min_images, extent_mass=settings.extent_mass, seed=config.fact.seed,
        batch_size=config.fact.batch_size, progress=progress,
    )
