"""Baseline heatmaps: random maps, the centre prior, and CAMs through the grad-cam package."""

import math

import pytest
import torch
from pytorch_grad_cam import GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from lib.kernels.cam import CAM_METHODS, cam_maps, centre_prior, random_maps


def test_random_maps_are_seeded_uniform_noise():
    maps = random_maps((50, 8, 8), seed=3)
    assert maps.shape == (50, 8, 8) and maps.dtype == torch.float32
    assert (maps >= 0).all() and (maps < 1).all()
    assert maps.mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(maps, random_maps((50, 8, 8), seed=3, device="cpu"))
    assert not torch.equal(maps, random_maps((50, 8, 8), seed=4))


def test_centre_prior_hand_computed():
    prior = centre_prior(2, 4, 4)
    assert prior.shape == (2, 4, 4) and torch.equal(prior[0], prior[1])
    # pixel (0, 0) sits 1.5 px from the centre on each axis; sigma = 0.25 * 4 = 1 px
    assert prior[0, 0, 0].item() == pytest.approx(math.exp(-0.5 * 1.5**2) ** 2)
    odd = centre_prior(1, 5, 5)[0]
    assert odd[2, 2].item() == 1.0 and odd.max().item() == 1.0
    torch.testing.assert_close(odd, odd.flip(0))
    torch.testing.assert_close(odd, odd.T)


def test_centre_prior_stretches_with_the_aspect_ratio():
    wide = centre_prior(1, 4, 8)[0]
    # sigma is 1 px vertically and 2 px horizontally; pixel (0, 3) is 1.5 px up and 0.5 px left
    assert wide[0, 3].item() == pytest.approx(math.exp(-0.5 * 1.5**2) * math.exp(-0.5 * 0.25**2))


def _tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    # the target layer (index 2) keeps the input resolution, so no resize enters the reference
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _images() -> torch.Tensor:
    return torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))


TARGETS = torch.tensor([0, 3, 1, 2, 0])


def test_gradcam_matches_a_hand_written_gradcam():
    model, images = _tiny_cnn(), _images()
    layer_out = {}
    handle = model[2].register_forward_hook(lambda _m, _i, out: layer_out.update(a=out))
    logits = model(images)
    handle.remove()
    acts = layer_out["a"]
    grads = torch.autograd.grad(logits.gather(1, TARGETS[:, None]).sum(), acts)[0]
    expected = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1)).detach()
    for _ in range(2):  # the package min-max scales per layer, then again after merging layers
        expected = expected - expected.amin(dim=(1, 2), keepdim=True)
        expected = expected / (1e-7 + expected.amax(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(cam_maps(model, model[2], images, TARGETS, "gradcam", batch_size=2), expected)


@pytest.mark.parametrize(("method", "cls"), [("gradcam++", GradCAMPlusPlus), ("scorecam", ScoreCAM)])
def test_chunked_cam_maps_equal_the_package_called_directly(method, cls):
    model, images = _tiny_cnn(), _images()
    with cls(model=model, target_layers=[model[2]]) as cam:
        targets = [ClassifierOutputTarget(c) for c in TARGETS.tolist()]
        expected = torch.from_numpy(cam(input_tensor=images, targets=targets))
    result = cam_maps(model, model[2], images, TARGETS, method, batch_size=2)
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_cam_maps_shape_range_and_side_effects(method):
    model, images = _tiny_cnn(), _images()
    model.train()
    with torch.no_grad():  # must still work: Grad-CAM needs gradients
        maps = cam_maps(model, model[2], images, TARGETS, method, batch_size=3)
    assert maps.shape == (5, 12, 12) and maps.dtype == torch.float32 and maps.device == images.device
    assert (maps >= 0).all() and (maps <= 1).all()
    assert model.training  # mode restored after the package switched to eval
    assert all(p.grad is None for p in model.parameters())


def test_score_cam_prints_no_progress_bars(capfd):
    model, images = _tiny_cnn(), _images()
    cam_maps(model, model[2], images, TARGETS, "scorecam", batch_size=2)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_cam_maps_of_a_frozen_model_equal_the_trainable_ones(method):
    model, images = _tiny_cnn(), _images()
    trainable = cam_maps(model, model[2], images, TARGETS, method)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    torch.testing.assert_close(cam_maps(model, model[2], images, TARGETS, method), trainable)


def test_cam_maps_differ_between_classes():
    model, images = _tiny_cnn(), _images()
    first = cam_maps(model, model[2], images, torch.zeros(5, dtype=torch.long))
    second = cam_maps(model, model[2], images, torch.ones(5, dtype=torch.long))
    assert not torch.allclose(first, second)


def test_cam_maps_bad_inputs():
    model, images = _tiny_cnn(), _images()
    with pytest.raises(ValueError, match="method must be one of"):
        cam_maps(model, model[2], images, TARGETS, "lrp")
    with pytest.raises(ValueError, match="targets must be non-negative integer"):
        cam_maps(model, model[2], images, TARGETS.float())
    with pytest.raises(ValueError, match="targets must be non-negative integer"):
        cam_maps(model, model[2], images, TARGETS[:3])
    with pytest.raises(ValueError, match="images must be"):
        cam_maps(model, model[2], images[0], TARGETS[:1])
    with pytest.raises(ValueError, match="batch_size must be"):
        cam_maps(model, model[2], images, TARGETS, batch_size=0)
    # the package's context manager would swallow this IndexError; cam_maps must not
    with pytest.raises(IndexError):
        cam_maps(model, model[2], images, torch.tensor([0, 1, 2, 3, 9]))


def test_baseline_bad_inputs():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        centre_prior(1, 4, 4, sigma=0.0)
    with pytest.raises(ValueError, match="batch, height and width must be >= 1"):
        centre_prior(1, 0, 4)
    with pytest.raises(ValueError, match="shape must have non-negative sizes"):
        random_maps((2, -1), seed=0)
