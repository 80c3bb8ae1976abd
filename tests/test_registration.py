"""The grid's registration: features sampled where the circles are, maps drawn there, regions read there.

The stored image is a coordinate ramp (red = x, green = y, times `gain`), so every view of it tells
where in the stored image each of its pixels comes from. CLIP's view, read at the circle centres,
says where the circles lie; a synthetic backbone (the backbone's real preprocessing, then average
pooling over stride x stride cells: a feature map that is a known function of position) says what
the bottleneck samples. The two must agree under crops that differ from CLIP's.
"""

import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from lib.kernels.preprocess import Preprocess
from lib.kernels.registration import Registration
from lib.kernels.rings import grid_centers

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CASES = {
    # ImageNet-like: stored 256 px; CLIP ViT-B/16 resizes it to 224; a torchvision ResNet-50
    # (IMAGENET1K_V2) resizes to 232 and centre-crops 224; layer4 = stride 32 (7 x 7)
    "imagenet": (256, 1, Preprocess(224, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
                 Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", resize_size=232), 32),
    # toy world: CLIP and backbone both see the 64 px image as is; layer3 = stride 8 (8 x 8)
    "toy": (64, 4, Preprocess(64, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
            Preprocess(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear"), 8),
    # the backbone sees a tight centre crop of an upscaled image (resize 320, crop 224 of 192 px)
    "zoomed": (192, 1, Preprocess(224, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
               Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", resize_size=320), 16),
}
GRID = 7


def ramp(size: int, gain: int) -> torch.Tensor:
    """uint8 (1, size, size, 3): red = gain * x, green = gain * y of each pixel (pixel i at i)."""
    axis = torch.arange(size) * gain
    image = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    image[0, :, :, 0] = axis[None, :]
    image[0, :, :, 1] = axis[:, None]
    return image


def stored_position(view: torch.Tensor, preprocess: Preprocess, gain: int) -> torch.Tensor:
    """Normalised (..., 3, h, w) views of the ramp -> (..., 2, h, w) (y, x) pixels of the stored image."""
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    value = (view * std + mean) * 255 / gain
    return torch.stack([value[..., 1, :, :], value[..., 0, :, :]], dim=-3)


def synthetic_backbone(image: torch.Tensor, preprocess: Preprocess, stride: int) -> torch.Tensor:
    """A feature map (1, 3, S / stride, S / stride): the preprocessed input averaged over each cell."""
    return F.avg_pool2d(preprocess(image), stride)


@pytest.mark.parametrize("case", CASES)
def test_features_are_sampled_where_clip_sees_the_circles(case):
    size, gain, prompt, backbone, stride = CASES[case]
    image = ramp(size, gain)
    registration = Registration((size, size), GRID, prompt, backbone)
    # where the circles lie: CLIP's own view, read at the ring centres (integer pixels of its input)
    centres = grid_centers(prompt.size, GRID).long()
    clip_view = stored_position(prompt(image)[0], prompt, gain)  # (2, S, S)
    truth = clip_view[:, centres[:, 0], centres[:, 1]].view(2, GRID, GRID)
    ys, xs = registration.centres()
    tolerance = 0.6  # uint8 rounding in the resizes: half a ramp step, over the gain
    torch.testing.assert_close(truth[0], ys[:, None].expand(GRID, GRID), atol=tolerance, rtol=0)
    torch.testing.assert_close(truth[1], xs[None, :].expand(GRID, GRID), atol=tolerance, rtol=0)
    # what the bottleneck reads: the synthetic backbone's features at the registered positions; a
    # circle beyond the backbone's outer cells (it sees a tighter crop) gets the nearest cell's value
    features = synthetic_backbone(image, backbone, stride)
    cells = stored_position(features[0], backbone, gain)  # (2, h, w): where each feature cell lies
    reachable = torch.stack([truth[0].clamp(float(cells[0].min()), float(cells[0].max())),
                             truth[1].clamp(float(cells[1].min()), float(cells[1].max()))])
    sampled = stored_position(registration.sample(features)[0], backbone, gain)
    torch.testing.assert_close(sampled, reachable, atol=tolerance, rtol=0)
    assert (reachable != truth).any() == (case == "zoomed")
    # a plain resize of the feature map to G x G reads elsewhere whenever the views differ
    resized = stored_position(F.interpolate(features, size=(GRID, GRID), mode="bilinear")[0], backbone, gain)
    assert (resized - truth).abs().max() > 3


@pytest.mark.parametrize("case", CASES)
def test_maps_are_drawn_at_the_circle_centres(case):
    size, _, prompt, backbone, _ = CASES[case]
    registration = Registration((size, size), GRID, prompt, backbone)
    ys, xs = registration.centres()
    # a map whose cells hold their own centre's x: drawn, it is the pixel's x between the outer
    # centres and constant beyond them
    up = registration.upsample(xs[None, :].expand(GRID, GRID))
    pixels = torch.arange(size, dtype=torch.float32)
    torch.testing.assert_close(up[size // 2], pixels.clamp(float(xs[0]), float(xs[-1])))
    rows = registration.upsample(ys[:, None].expand(GRID, GRID))
    torch.testing.assert_close(rows[:, size // 3], pixels.clamp(float(ys[0]), float(ys[-1])))


def test_regions_read_the_grid_through_the_adjoint_of_the_drawing():
    size, _, prompt, backbone, _ = CASES["imagenet"]
    registration = Registration((size, size), GRID, prompt, backbone)
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(5, GRID, GRID, generator=g)
    mask = torch.rand(size, size, generator=g) > 0.7
    drawn = (registration.upsample(maps) * mask).sum(dim=(1, 2))
    read = (registration.region_weights(mask) * maps).sum(dim=(1, 2))
    torch.testing.assert_close(read, drawn, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(registration.region_shares(torch.ones(size, size)), torch.ones(GRID, GRID))
    shares = registration.region_shares(mask)
    assert bool(((shares > 0) & (shares < 1)).all())


def test_registration_round_trips_and_checks_its_grid():
    size, _, prompt, backbone, _ = CASES["imagenet"]
    registration = Registration((size, size), GRID, prompt, backbone)
    again = Registration.from_dict(registration.to_dict())
    assert again == registration and torch.equal(again.feature_grid(), registration.feature_grid())
    assert registration.feature_grid().shape == (GRID, GRID, 2)
    with pytest.raises(ValueError, match="larger than the image"):
        Registration((size, size), 300, prompt, backbone)
    with pytest.raises(ValueError, match=r"maps must end in the \(7, 7\) grid"):
        registration.upsample(torch.zeros(5, 5))


@pytest.mark.parametrize(("mode", "resize_size"), [("shortest", None), ("shortest", 80), ("longest", None), ("squash", None)])
@pytest.mark.parametrize("shape", [(50, 90), (90, 50), (64, 64)])
def test_view_matches_the_transform(mode, resize_size, shape):
    """Preprocess.view (used by the registration) agrees with what Preprocess does to an image."""
    preprocess = Preprocess(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", mode, resize_size)
    height, width = shape
    image = torch.zeros(1, height, width, 3, dtype=torch.uint8)
    image[0, :, :, 0] = (torch.arange(width) * 2)[None, :]
    image[0, :, :, 1] = (torch.arange(height) * 2)[:, None]
    image[0, :, :, 2] = 255  # marks the image (0 = padding)
    out = preprocess(image)[0] * 255
    (sy, oy), (sx, ox) = preprocess.view(height, width)
    inside = out[2] > 254
    pixel_y, pixel_x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    expected_x = ((pixel_x + 0.5 + ox) / sx - 0.5) * 2  # the red value the pixel reads, by the view
    expected_y = ((pixel_y + 0.5 + oy) / sy - 0.5) * 2
    core = inside & (expected_x > 4) & (expected_x < 2 * width - 6) & (expected_y > 4) & (expected_y < 2 * height - 6)
    assert core.sum() > 100  # away from the borders, where resizing clamps the ramp
    torch.testing.assert_close(out[0][core], expected_x[core], atol=1.5, rtol=0)
    torch.testing.assert_close(out[1][core], expected_y[core], atol=1.5, rtol=0)
    # padding ("longest") lies exactly where the view puts no image
    in_view = ((pixel_x + 0.5 + ox) / sx > 0) & ((pixel_x + 0.5 + ox) / sx < width)
    in_view &= ((pixel_y + 0.5 + oy) / sy > 0) & ((pixel_y + 0.5 + oy) / sy < height)
    assert torch.equal(inside, in_view)
