"""compare's CE-FAM contributions (lib/compare/cefam.py): the regions stage's code path, signed, every present concept.

Reads the toy pipeline's outputs (dvc checkout); skipped where they are missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.core.layout import Layout
from lib.core.params import load_params
from lib.core.stores import open_store
from lib.data.manifest import read_dataset_info
from lib.evaluate.adapters.cefam import FACTORIES
from lib.evaluate.registry import EvalBatch, EvalContext
from lib.evaluate.truth import GroundTruth


@pytest.fixture(scope="module")
def setup():
    config = load_params("params.yaml")
    layout = Layout.from_params(config)
    needed = (layout.cefam_regions, layout.concept_stats("cefam"), layout.cefam_translator, layout.counterfactuals, layout.concepts)
    if not all(path.exists() for path in needed):
        pytest.skip("the toy pipeline's CE-FAM outputs are not checked out (dvc checkout)")
    from lib.compare.cefam import signed_cefam

    device = torch.device("cpu")
    truth = GroundTruth.from_info(read_dataset_info(layout.dataset_info))
    inner = FACTORIES["cefam"](EvalContext(config, layout, device, truth))
    rows = open_store(layout.counterfactuals)["image"][:][:6]
    store = open_store(layout.images)
    batch = EvalBatch(torch.from_numpy(rows), torch.from_numpy(store["images"].get_orthogonal_selection((rows,))),
                      torch.from_numpy(store["labels"].get_orthogonal_selection((rows,))))
    method = signed_cefam(inner, config, layout, device)
    method.reuse_stored = False  # recompute every pair, the stored ones included
    present = store["masks"].get_orthogonal_selection((rows,))[:, inner.concepts.numpy()].any(axis=(2, 3))
    return method.concept_contributions(batch).values.numpy(), inner.concept_contributions(batch).values.numpy(), present, method, batch


def test_recomputed_contributions_equal_the_stored_positive_ones(setup):
    signed, stored, *_ = setup
    both = np.isfinite(signed) & np.isfinite(stored)
    assert both.sum() >= 10
    np.testing.assert_allclose(signed[both], stored[both], atol=1e-5, rtol=1e-5)


def test_every_present_concept_gets_a_signed_contribution(setup):
    signed, stored, present, *_ = setup
    assert np.array_equal(np.isfinite(signed), present)  # every present concept, NaN for the others
    assert (signed[present] < 0).any()  # negatives now appear
    assert np.isfinite(signed[present]).sum() > np.isfinite(stored[present]).sum()


def test_concept_removal_equals_the_association_masking_of_each_concept(setup):
    """CefamRemoval with one concept removed per state gives the logit CE-FAM's own masking curve reaches
    after all top_k channels of that concept are replaced (association.class_masking_curves through the
    layer's tail, a separate code path from the hooked forward); no concept removed gives the original."""
    from lib.compare.curves import CefamRemoval
    from lib.methods.cefam.association import class_masking_curves

    *_, present, method, batch = setup
    image = 0
    columns = np.flatnonzero(present[image])
    assert len(columns) >= 3
    one = EvalBatch(batch.index[:1], batch.images[:1], batch.labels[:1])
    removed = torch.zeros(1, len(columns) + 1, int(method.inner.concepts.max()) + 1, dtype=torch.bool)
    for state, column in enumerate(columns, start=1):
        removed[0, state, int(method.inner.concepts[column])] = True
    original, logits = CefamRemoval(method).logits(one, removed)
    torch.testing.assert_close(logits[0, 0], original[0], rtol=1e-5, atol=1e-5)

    pairs = torch.tensor([[0, int(c)] for c in columns])
    best, _ = method.top_channels(one, pairs)
    concept = method.inner.columns[pairs[:, 1]]
    full, maps, _, z_list, betas = method._pair_forward(one.images.expand(len(columns), -1, -1, -1), concept)
    target = method.class_map.output_of(method.class_map.predict(full.float()))
    for i, position in enumerate(best.tolist()):
        layer = method.explained[position]
        importance = (betas[layer][i] * z_list[layer][i])[None, None]
        with torch.no_grad():
            drop = class_masking_curves(method.tails[position], maps[layer][i : i + 1], importance, target[i : i + 1],
                                        k=method.settings.top_k, fill=method.fills[position], relative=False, prob="logit")
        torch.testing.assert_close(logits[0, i + 1], original[0] - drop[0, 0, -1], rtol=1e-4, atol=1e-4)
