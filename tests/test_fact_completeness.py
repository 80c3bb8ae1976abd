"""The completeness check that can fail (lib/methods/fact/completeness.py, contributions_stage's
explain_batch): concept j's logit through the tail frozen at x̂, computed without autograd, equals C_j
in explanation mode and misses it by >= 0.1 max|C_j| with explanation mode off -- while the old
check, sum_j C_j = y_c - b, still holds to ~1e-7 then."""

import copy

import pytest
import torch

from lib.methods.fact.backbone import FactBackbone
from lib.methods.fact.completeness import frozen_contributions
from lib.methods.fact.contributions import concept_contributions, splice
from lib.methods.fact.contributions_stage import explain_batch
from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.models.layers import extract_layers, split_at
from lib.toy.models.cnn import build_toy, toy_preprocess

CHANNELS = {"layer2": 64, "layer3": 128}


def _toy(arch: str, layer: str, seed: int = 0):
    """A random toy backbone cut at `layer`, a random SAE on it, and the layer's features of 6 images."""
    torch.manual_seed(seed)
    model = build_toy(arch, 8).eval()
    _, tail = split_at(model, layer)
    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    preprocess = toy_preprocess(arch, 64)
    with torch.no_grad():
        feats = extract_layers(model, preprocess(images), [layer])[layer]
    feats = feats / feats.abs().mean()  # a random net's features are ~1e-3, where B-cos's norm epsilon (1e-6) breaks Euler
    sae = BiasFreeTopKSAE(CHANNELS[layer], 48, 6, generator=torch.Generator().manual_seed(seed)).eval()
    return FactBackbone(model, layer, tail.eval(), preprocess, None, f"toy:{arch}"), sae, feats


def _relative(c: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (c.double() - reference).abs().amax(dim=1) / reference.abs().amax(dim=1)


@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_bcos_contributions_are_the_frozen_tails_in_explanation_mode_only(layer: str):
    backbone, sae, feats = _toy("bcos", layer)
    on = explain_batch(backbone, sae, feats)
    off = explain_batch(backbone, sae, feats, explanation_mode=False)
    assert on["concept_error"].max() <= 1e-5 and on["completeness"].max() <= 1e-5
    # explanation mode off: the total still matches (Euler: the B-cos tail is positively homogeneous) ...
    assert off["completeness"].max() <= 1e-5
    # ... but single C_j move: the check fails by at least 0.1 of the largest |C_j| in some image
    assert off["concept_error"].max() >= 0.1
    assert on["spliced_error"].equal(off["spliced_error"])  # the logits themselves do not depend on the mode


def test_a_sampled_reference_checks_the_first_images_only_and_still_fails_with_explanation_mode_off():
    """fact.completeness_check_images: the first n images of a batch get the per-concept error (the same
    values as a full check), the rest NaN; the sampled check still catches explanation mode off."""
    backbone, sae, feats = _toy("bcos", "layer3")
    full = explain_batch(backbone, sae, feats, explanation_mode=False)
    sampled = explain_batch(backbone, sae, feats, explanation_mode=False, reference_images=3)
    assert torch.isnan(sampled["concept_error"][3:]).all()
    torch.testing.assert_close(sampled["concept_error"][:3], full["concept_error"][:3])
    assert sampled["concept_error"][:3].max() >= 0.1
    assert sampled["completeness"].equal(full["completeness"])


def test_the_reference_is_independent_of_autograd_and_covers_relu_tails():
    """On the toy CNN the tail after layer2 (ReLU block with BatchNorm shifts) is piecewise affine:
    frozen at x̂ (ReLU gates), concept j's logit minus the frozen tail's offset is its gradient x
    input share C_j, although sum_j C_j != y_c - b there (the BatchNorm shifts)."""
    backbone, sae, feats = _toy("cnn", "layer2")
    with torch.no_grad():  # as after training: BatchNorm shifts make the tail affine, not linear
        for norm in (m for m in backbone.tail.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.bias.normal_()
            norm.running_mean.normal_()
    backbone.__dict__.pop("tail64", None)
    out = concept_contributions(backbone.tail, sae, feats)
    codes, x_hat = splice(sae, feats)
    reference = frozen_contributions(copy.deepcopy(backbone.tail).double(), x_hat, codes, sae.atoms, out.target)
    assert _relative(out.contributions, reference).max() <= 1e-5
    assert explain_batch(backbone, sae, feats)["completeness"].max() > 1e-3


def test_a_tail_with_an_unfrozen_dynamic_module_has_no_reference():
    from bcos.modules.norms.uncentered_norms import GroupNormUncentered2d

    backbone, sae, feats = _toy("bcos", "layer3")
    tail = torch.nn.Sequential(GroupNormUncentered2d(4, 128), backbone.tail).eval()
    codes, x_hat = splice(sae, feats)
    with pytest.raises(NotImplementedError, match="GroupNormUncentered2d"):
        frozen_contributions(tail.double(), x_hat, codes, sae.atoms, torch.zeros(6, dtype=torch.long))
