"""The C²-Score (FaCT §4; lib/methods/fact/c2.py, the authors' definition) of every method with concept maps.

FaCT's contributions stage scores its SAE latents (metrics/fact.json c2_delta); here SALF-CBM and
CE-FAM (Top-1 layer) go through the same code (`select_concept_images`, `c2_scores`) with the same
featurizer (`fact.c2.featurizer`, featurizers.load_featurizer) and the same `fact.c2` settings, on the
compare images: presence = the method's own score of each of its ground-truth concepts (SALF-CBM its
standardised activation c*, CE-FAM its concept score S^t), maps = its concept maps at the images' size
as `evaluate` scores them (the `concept_maps` protocol; clipped at 0 by the encoding). FaCT's row takes
the stage's own c2_delta (its definition: every latent, all test images). Methods without concept
maps (the Grad-CAM family) and the baselines get None.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.evaluate.adapters.cefam import CefamMaps
from lib.evaluate.adapters.salf import SalfMaps
from lib.evaluate.registry import ConceptMapMethod, EvalBatch
from lib.methods.cefam.artifacts import REGION_PRESENCE
from lib.methods.fact.c2 import C2Result, TopImages, c2_scores, select_concept_images, selection_depth
from lib.methods.fact.featurizers import load_featurizer, read_any

__all__ = ["c2_fields", "c2_of_method", "c2_row", "method_c2", "presence_of"]

Presence = Callable[[Tensor], Tensor]  # sorted store rows (B,) -> presence (B, M') of the method's ground-truth concepts


def presence_of(method: ConceptMapMethod) -> Presence | None:
    """The method's own presence score of its ground-truth concepts, in its concept_maps' order; None if it has none here."""
    if isinstance(method, SalfMaps):
        def salf(rows: Tensor) -> Tensor:
            raw = method.model.concept_maps(torch.from_numpy(read_rows(method.features, rows.cpu().numpy())))
            return method.model.classifier.activations(raw)[:, method.columns.to(raw.device)]  # c*, standardised
        return salf
    inner = getattr(method, "inner", method)  # compare's SignedCefam wraps the adapter
    if isinstance(inner, CefamMaps):
        def cefam(rows: Tensor) -> Tensor:
            values = read_rows(inner.store.group[REGION_PRESENCE], inner.store.rows(rows.cpu().numpy()))
            return torch.from_numpy(values[:, inner.columns.numpy()])  # S^t
        return cefam
    return None


def c2_of_method(config: Params, method: ConceptMapMethod, presence: Presence, images, labels, featurizer: Callable[[Tensor], Tensor],
                 rows: np.ndarray, device: torch.device) -> C2Result:
    """C² of `method`'s ground-truth concepts over store rows `rows` (sorted), by fact.c2's settings."""
    settings = config.fact.c2
    index = torch.from_numpy(np.asarray(rows, np.int64))
    size = tuple(images.shape[1:3])
    top = TopImages(selection_depth(len(index), settings.top_fraction, settings.min_images))
    for start in range(0, len(index), config.evaluate.batch_size):
        chunk = index[start : start + config.evaluate.batch_size]
        top.add(presence(chunk).float().cpu(), chunk)
    selection = select_concept_images(top.result(), top.n_positive, settings.top_fraction, settings.min_images, settings.min_count)

    def maps(pair_rows: Tensor, concepts: Tensor) -> Tensor:  # pairs come ordered by image
        unique, inverse = torch.unique(pair_rows, return_inverse=True)
        batch = EvalBatch(unique.to(device), torch.from_numpy(read_any(images, unique.numpy())).to(device),
                          torch.from_numpy(read_any(labels, unique.numpy())).to(device))
        given = method.concept_maps(batch).maps.detach().float()
        given = given if tuple(given.shape[-2:]) == size else F.interpolate(given, size=size, mode="bilinear", align_corners=False)
        return given[inverse.to(given.device), concepts.to(given.device)]

    return c2_scores(selection, index, maps, featurizer, size, mean_min_images=settings.mean_min_images,
                     extent_mass=settings.extent_mass, seed=config.fact.seed, batch_size=config.evaluate.batch_size)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def c2_fields(result: C2Result | None, featurizer: str | None, source: str | None) -> dict:
    """The compare row's "c2" sub-dict: Δ_rand (the column), C², the random baseline, concepts averaged."""
    if result is None:
        return {"delta": None, "c2": None, "random": None, "concepts": None, "featurizer": featurizer, "source": source}
    return {"delta": _finite(result.c2_delta), "c2": _finite(result.c2), "random": _finite(result.c2_random),
            "concepts": result.n_averaged, "featurizer": featurizer, "source": source}


def c2_row(c2: dict[str, dict], name: str) -> dict:
    """Method `name`'s "c2" sub-dict of `method_c2`'s result; all None (N/A) for a method without one."""
    return c2.get(name, c2_fields(None, None, None))


def method_c2(config: Params, layout: Layout, device: torch.device, methods: Sequence[ConceptMapMethod],
              rows: np.ndarray) -> dict[str, dict]:
    """{method: its "c2" sub-dict} of the methods with concept maps and a presence score, plus FaCT's from
    metrics/fact.json (computed by its contributions stage with the same featurizer)."""
    featurizer = load_featurizer(config, layout, device)
    store = open_store(layout.images)
    out = {}
    for method in methods:
        presence = presence_of(method)
        if presence is not None:
            result = c2_of_method(config, method, presence, store["images"], store["labels"], featurizer, np.sort(rows), device)
            out[method.name] = c2_fields(result, featurizer.name, "compare")
    fact = json.loads(layout.fact_metrics.read_text()) if layout.fact_metrics.exists() else {}
    if "c2_delta" in fact:
        out["fact"] = {"delta": fact["c2_delta"], "c2": fact.get("c2"), "random": fact.get("c2_random"),
                       "concepts": fact.get("c2_concepts"), "featurizer": fact.get("c2_featurizer"), "source": "fact.json"}
    return out
