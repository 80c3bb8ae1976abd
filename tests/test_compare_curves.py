"""Deletion and insertion curves (lib/compare/curves.py): orders, removal operators, pixel fills."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lib.compare.curves import (
    FactRemoval,
    SalfRemoval,
    blur,
    composite,
    curve_auc,
    mean_fill,
    normalised,
    random_order,
    removal_states,
    top_pixel_masks,
)
from lib.core.params import Params, ParamsError, load_params
from lib.evaluate.registry import EvalBatch
from lib.methods.fact.contributions import splice
from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.methods.salf.classifier import ConceptClassifier
from lib.methods.salf.pooling import Standardiser
from lib.toy import counterfactual


def _additive_curves(order: np.ndarray, effects: np.ndarray, base: float, steps: int, insertion: bool) -> np.ndarray:
    """Normalised curves of an additive model y = base + sum of the kept concepts' effects."""
    removed = removal_states(order, steps, insertion)
    original = base + effects.sum(axis=1)
    return normalised(base + (effects[:, None] * ~removed).sum(axis=2), original)[:, 1:]


def test_the_true_effect_order_deletes_faster_and_inserts_faster_than_reversed_and_random():
    rng = np.random.default_rng(0)
    effects = rng.exponential(1.0, (200, 8)) * (rng.random((200, 8)) < 0.7)
    args = (effects, 1.0, 5)
    auc = {name: (curve_auc(_additive_curves(order, *args, False)), curve_auc(_additive_curves(order, *args, True)))
           for name, order in {"true": effects, "reversed": -effects, "random": random_order(effects, 0)}.items()}
    assert auc["true"][0] < auc["random"][0] < auc["reversed"][0]
    assert auc["true"][1] > auc["random"][1] > auc["reversed"][1]


def test_removal_states_remove_in_order_and_never_an_unscored_concept():
    values = np.array([[0.5, np.nan, 2.0, -1.0]])
    deletion, insertion = removal_states(values, 4, False)[0], removal_states(values, 4, True)[0]
    assert deletion.tolist() == [[False] * 4, [False, False, True, False], [True, False, True, False],
                                 [True, False, True, True], [True, False, True, True]]
    assert insertion[0].tolist() == [True, False, True, True] and insertion[1].tolist() == [True, False, False, True]
    assert not insertion[3:].any() and not removal_states(values, 4, False)[..., 1].any()
    shuffled = random_order(values, 3)
    assert np.array_equal(np.isfinite(shuffled), np.isfinite(values))


def test_normalisation_leaves_out_images_whose_original_logit_is_not_positive():
    curves = normalised(np.array([[1.0, 0.5], [2.0, 1.0]]), np.array([2.0, -1.0]))
    assert curves[0].tolist() == [0.5, 0.25] and np.isnan(curves[1]).all()
    assert curve_auc(curves) == pytest.approx(0.375)
    assert curve_auc(np.full((2, 3), np.nan)) is None


def _batch(n: int) -> EvalBatch:
    return EvalBatch(torch.arange(n), torch.zeros(n, 8, 8, 3, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))


def test_salf_removal_is_the_logit_with_c_star_zeroed_by_hand():
    torch.manual_seed(0)
    b, m, classes = 4, 5, 3
    classifier = ConceptClassifier("avg", Standardiser(torch.randn(m), torch.rand(m) + 0.5), torch.randn(classes, m), torch.randn(classes),
                                   tuple(f"c{i}" for i in range(m)), tuple(f"k{i}" for i in range(classes)))
    maps = torch.randn(b, m, 3, 3)
    columns, concepts = torch.tensor([0, 2, 3]), torch.tensor([4, 1, 0])  # bottleneck channel -> ground-truth id
    method = SimpleNamespace(model=SimpleNamespace(classifier=classifier), _maps=lambda batch: maps, columns=columns, concepts=concepts)
    removed = torch.zeros(b, 2, 6, dtype=torch.bool)
    removed[:, 1, 1] = removed[:, 1, 4] = True  # ground-truth 1 and 4: channels 2 and 0
    original, logits = SalfRemoval(method).logits(_batch(b), removed)

    c_star = (maps.mean(dim=(2, 3)) - classifier.standardiser.mean) / classifier.standardiser.std
    predicted = (c_star @ classifier.weight.T + classifier.bias).argmax(dim=1)
    by_hand = c_star.clone()
    by_hand[:, [2, 0]] = 0
    expected = (by_hand * classifier.weight[predicted]).sum(dim=1) + classifier.bias[predicted]
    torch.testing.assert_close(logits[:, 1], expected)
    torch.testing.assert_close(logits[:, 0], original)


def test_fact_removal_is_the_tail_of_the_reconstruction_with_the_latent_dropped():
    torch.manual_seed(0)
    b, c, j = 3, 6, 10
    sae = BiasFreeTopKSAE(c, j, 4)
    tail = nn.Sequential(nn.Conv2d(c, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone = SimpleNamespace(tail=tail, explained_output=lambda logits: (logits.argmax(dim=1), logits.argmax(dim=1)))
    acts = torch.randn(b, c, 4, 4).relu()
    method = SimpleNamespace(_acts=lambda batch: acts, sae=sae, backbone=backbone, latents=torch.tensor([7, 2, 7]),
                             concepts=torch.tensor([0, 1, 2]))
    removed = torch.zeros(b, 3, 3, dtype=torch.bool)
    removed[:, 1, 0] = True  # latent 7 (concepts 0 and 2 share it: dropped once)
    removed[:, 2] = True  # latents 7 and 2
    original, logits = FactRemoval(method).logits(_batch(b), removed)

    with torch.no_grad():
        codes, x_hat = splice(sae, acts)
        target = tail(x_hat).argmax(dim=1)
        for step, drop in enumerate(([], [7], [7, 2])):
            kept = codes.clone()
            kept[:, :, drop] = 0
            edited = sae.decode(kept.reshape(-1, j)).reshape(b, 4, 4, c).permute(0, 3, 1, 2)
            torch.testing.assert_close(logits[:, step], tail(edited).gather(1, target[:, None])[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(original, tail(x_hat).gather(1, target[:, None])[:, 0])


def test_background_fill_of_the_objects_is_the_scene_rendered_without_them():
    scenes = counterfactual.replay(12, seed=5, image_size=32)
    images, masks = counterfactual.render_chunk(scenes, 0)
    empty, _ = counterfactual.render_chunk(scenes, 0, np.full_like(scenes.objects, -1))
    background_types = [i for i, c in enumerate(counterfactual.world.CONCEPTS) if c.type == "background"]
    on_objects = ~masks[:, background_types].any(axis=1)
    assert on_objects.any(axis=(1, 2)).all()
    filled = composite(torch.from_numpy(images), torch.from_numpy(empty), torch.from_numpy(on_objects)[:, None])[:, 0]
    assert np.array_equal(filled.numpy(), empty)  # off the objects the rendering is the background already
    assert not np.array_equal(images, empty)


@pytest.mark.parametrize("fill", [blur, mean_fill])
def test_blur_and_mean_fill_change_only_the_selected_pixels(fill):
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    masks = top_pixel_masks(torch.from_numpy(rng.random((3, 16, 16)).astype(np.float32)), [0.1, 0.5])
    out = composite(images, fill(images), masks)
    same = (out == images[:, None]).all(dim=-1)
    assert same[~masks].all() and not same[masks].all()
    assert fill(images).dtype == torch.uint8 and fill(images).shape == images.shape


def test_top_pixel_masks_select_the_highest_share_of_each_map():
    maps = torch.rand(2, 10, 10)
    masks = top_pixel_masks(maps, [0.05, 0.3])
    assert masks.sum(dim=(2, 3)).tolist() == [[5, 30], [5, 30]]
    for i in range(2):
        assert maps[i][masks[i, 1]].min() > maps[i][~masks[i, 1]].max()
    assert (masks[:, 0] <= masks[:, 1]).all()  # nested


def test_blur_keeps_a_constant_image():
    images = torch.full((1, 12, 12, 3), 77, dtype=torch.uint8)
    assert torch.equal(blur(images), images)


def test_curve_params_are_validated(tmp_path):
    import yaml

    base = yaml.safe_load(Path("params.yaml").read_text())
    cases = (({"curve_images": 500, "max_images": 200}, "curve_images"), ({"pixel_fractions": [0.5, 0.1]}, "pixel_fractions"))
    for change, needle in cases:
        data = {**base, "compare": {**base["compare"], **change}}
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ParamsError, match=needle):
            load_params(path)
    assert isinstance(load_params("params.yaml"), Params)
