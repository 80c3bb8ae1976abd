"""compare's CE-FAM contributions (lib/compare/cefam.py): the regions stage's code path, signed, every present
concept; and its concept removal (lib/compare/curves.py). On the tiny CE-FAM project of test_cefam_stages
(random CLIP and CNN, translator and regions run by the stages), so they run without the DVC outputs."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core.layout import Layout
from lib.core.params import load_params
from lib.core.stores import open_store
from lib.data.manifest import read_dataset_info, read_manifest, split_indices
from lib.evaluate.adapters.cefam import FACTORIES
from lib.evaluate.registry import EvalBatch, EvalContext
from lib.evaluate.truth import GroundTruth
from tests.stage_cli import invoke, merge_params
from tests.test_cefam_stages import project  # noqa: F401  (the module-scoped fixture: the stages run once here)


@pytest.fixture(scope="module")
def setup(project: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """The project's regions rerun with a contribution for every concept (negatives still dropped, as the
    authors'), so the store holds enough positives to compare with."""
    from lib.compare.cefam import signed_cefam

    root = tmp_path_factory.mktemp("compare_cefam") / "project"
    shutil.copytree(project, root)
    regions = {**load_params(root / "params.yaml").cefam.regions.model_dump(mode="json"), "contribution_concepts": 100}
    merge_params(root, cefam={**load_params(root / "params.yaml").cefam.model_dump(mode="json"), "regions": regions})
    result = invoke(root, "regions")
    assert result.exit_code == 0, result.output
    config = load_params(root / "params.yaml")
    layout = Layout.from_params(config, base=root / "data")
    device = torch.device("cpu")
    truth = GroundTruth.from_info(read_dataset_info(layout.dataset_info))
    inner = FACTORIES["cefam"](EvalContext(config, layout, device, truth))
    rows = split_indices(read_manifest(layout.manifest), config.evaluate.split)
    store = open_store(layout.images)
    batch = EvalBatch(torch.from_numpy(rows), torch.from_numpy(store["images"].get_orthogonal_selection((rows,))),
                      torch.from_numpy(store["labels"].get_orthogonal_selection((rows,))))
    with contextlib.chdir(root):  # backbone.weights is relative to the project
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
