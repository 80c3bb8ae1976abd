"""Red-circle ring masks, blending and the CircleEncoder."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageDraw

from lib.kernels.preprocess import Preprocess
from lib.kernels.rings import CircleEncoder, blend_rings, grid_centers, ring_alpha, validate_grid

RED = (255, 0, 0)


def pil_reference_alpha(size: int, center: tuple[int, int], radius: float, width: float, factor: int = 4):
    """Ring drawn by Pillow on a `factor`x canvas, box-downsampled: an antialiased reference alpha.

    Pillow's ellipse outline lies inside its bounding box, so the box is the outer edge
    radius + width/2; pixel i of the image spans sub-pixels factor*i .. factor*i + factor - 1.
    """
    canvas = Image.new("L", (size * factor, size * factor), 0)
    cy, cx = (factor * c + (factor - 1) / 2 for c in center)
    outer = factor * (radius + width / 2) - 0.5
    ImageDraw.Draw(canvas).ellipse(
        [cx - outer, cy - outer, cx + outer, cy + outer], outline=255, width=round(factor * width)
    )
    return torch.from_numpy(np.asarray(canvas.reduce(factor), dtype=np.float32) / 255)


def test_grid_centers_match_salf_cbm_stride():
    centers = grid_centers(224, 7)
    assert centers.shape == (49, 2) and centers.dtype == torch.float32
    assert centers[0].tolist() == [28.0, 28.0]
    assert centers[1].tolist() == [28.0, 56.0]  # row-major: x varies fastest
    assert centers[7].tolist() == [56.0, 28.0]
    assert centers[-1].tolist() == [196.0, 196.0]
    assert grid_centers(10, 2).tolist() == [[3.0, 3.0], [3.0, 6.0], [6.0, 3.0], [6.0, 6.0]]


def test_ring_alpha_hand_computed_pixels():
    alpha = ring_alpha(64, torch.tensor([[30.0, 30.0]]), radius=10.0, width=2.0)[0]
    assert alpha.shape == (64, 64) and alpha.dtype == torch.float32
    assert alpha[30, 40] == 1.0  # on the ring, axis-aligned: pixel [9.5, 10.5] inside [9, 11]
    assert alpha[30, 41] == pytest.approx(0.5)  # pixel [10.5, 11.5] half inside the outer edge
    assert alpha[30, 30] == 0.0 and alpha[30, 35] == 0.0 and alpha[0, 0] == 0.0
    assert alpha.min() >= 0 and alpha.max() <= 1
    # Total coverage is the annulus area 2*pi*r*w.
    assert alpha.sum().item() == pytest.approx(2 * math.pi * 10 * 2, rel=5e-3)


def test_ring_alpha_matches_dense_point_sampling():
    """Analytic coverage vs 32x32 point samples per pixel of the exact annulus."""
    size, radius, width, n = 40, 7.5, 1.5, 32
    center = torch.tensor([[19.0, 21.3]])
    alpha = ring_alpha(size, center, radius, width)[0]
    offsets = (torch.arange(n) + 0.5) / n - 0.5
    sub = torch.arange(size).view(-1, 1) + offsets.view(1, -1)  # (size, n)
    dy = sub.view(size, 1, n, 1) - center[0, 0]
    dx = sub.view(1, size, 1, n) - center[0, 1]
    inside = (torch.hypot(dy, dx) - radius).abs() <= width / 2
    sampled = inside.float().mean(dim=(2, 3))
    assert (alpha - sampled).abs().max() < 0.04
    assert alpha.sum().item() == pytest.approx(sampled.sum().item(), rel=5e-3)


def test_blend_rings_equals_pillow_drawing_then_normalising():
    """Our on-device circled tensor vs Pillow: antialiased ring composited on the raw uint8 image.

    Tolerance: the Pillow reference rasterises at 4x (16 samples per pixel), so its coverage is
    quantised to 1/16 and its edges sit within 1/8 px; against it our analytic alpha differs by
    at most 0.08 (measured 0.056-0.063 at width 2) and ~0.016 on average over ring pixels; at 16x
    the gap shrinks to < 0.03, i.e. the residual is Pillow's sampling. Composite rounding adds
    <= 1 grey level. Off the ring both are exactly the image.
    """
    size, radius, width = 64, 12.0, 2.0
    prep = Preprocess(size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)  # 64 px images: not resized
    gen = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=gen)
    centers = grid_centers(size, 3)
    alpha = ring_alpha(size, centers, radius, width)
    ours = blend_rings(prep(raw[None]), alpha, prep.normalise_color(RED))
    std = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
    for v, (cy, cx) in enumerate(centers.int().tolist()):
        mask = pil_reference_alpha(size, (cy, cx), radius, width)
        drawn = Image.composite(
            Image.new("RGB", (size, size), RED),
            Image.fromarray(raw.numpy()),
            Image.fromarray((mask.numpy() * 255).round().astype(np.uint8)),
        )
        ref = prep(torch.from_numpy(np.asarray(drawn).copy())[None])[0]
        levels = (ours[v] - ref).abs() * std * 255  # error in grey levels of the raw image
        assert levels.max() <= 0.08 * 255 + 1
        ring = (mask > 0) | (alpha[v] > 0)
        assert levels[:, ring].mean() <= 0.02 * 255
        torch.testing.assert_close(ours[v][:, ~ring], ref[:, ~ring], atol=1e-5, rtol=0)


def test_blend_rings_layouts_and_formula():
    x = torch.randn(2, 3, 5, 5)
    alpha = torch.rand(3, 5, 5)
    color = torch.tensor([1.0, -1.0, 0.5])
    out = blend_rings(x, alpha, color)
    assert out.shape == (6, 3, 5, 5)
    for b in range(2):
        for v in range(3):  # image-major
            expected = x[b] * (1 - alpha[v]) + color.view(3, 1, 1) * alpha[v]
            torch.testing.assert_close(out[b * 3 + v], expected)
    one_each = blend_rings(x, alpha[:2], color, per_image=True)
    torch.testing.assert_close(one_each[1], x[1] * (1 - alpha[1]) + color.view(3, 1, 1) * alpha[1])
    with pytest.raises(ValueError, match="ambiguous"):
        blend_rings(x, alpha[:2], color)
    with pytest.raises(ValueError, match="alpha must have shape"):
        blend_rings(x, torch.rand(3, 4, 4), color)


@pytest.mark.parametrize(
    ("size", "grid", "radius", "width", "message"),
    [
        (8, 8, 2.0, 1.0, "larger than the image"),
        (64, 0, 2.0, 1.0, "grid must be >= 1"),
        (64, 3, 0.0, 1.0, "radius must be > 0"),
        (64, 3, -4.0, 1.0, "radius must be > 0"),
        (64, 3, 8.0, 0.0, "width must be > 0"),
        (64, 3, 2.0, 4.0, "has a hole"),
        (64, 3, 80.0, 2.0, "too large"),
    ],
)
def test_validate_grid_rejects(size, grid, radius, width, message):
    with pytest.raises(ValueError, match=message):
        validate_grid(size, grid, radius, width)


def test_validate_grid_accepts_paper_default():
    validate_grid(224, 7, 32.0, 2.0)
    validate_grid(64, 3, 45.0, 2.0)  # inner edge 44 < 45.25, the centre ring's corner reach


def test_circle_encoder_equals_per_variant_encoding(tiny_clip, clip_preprocess):
    model, prep = tiny_clip, clip_preprocess
    size, grid = prep.size, 3
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=gen)
    encoder = CircleEncoder(model, prep, grid=grid, radius=6.0, width=2.0, chunk=7, autocast=False)
    circles = encoder(images)
    assert circles.shape == (2, grid, grid, 32)
    torch.testing.assert_close(circles.norm(dim=-1), torch.ones(2, grid, grid))

    alpha = ring_alpha(size, grid_centers(size, grid), 6.0, 2.0)
    color = prep.normalise_color(RED).view(3, 1, 1)
    with torch.no_grad():
        x = prep(images)
        for h in range(grid):
            for w in range(grid):
                a = alpha[h * grid + w]
                single = F.normalize(model.encode_image(x * (1 - a) + color * a), dim=-1)
                torch.testing.assert_close(circles[:, h, w], single, atol=1e-5, rtol=1e-4)

    one_forward = CircleEncoder(model, prep, grid=grid, radius=6.0, width=2.0, chunk=1000, autocast=False)
    torch.testing.assert_close(one_forward(images), circles, atol=1e-5, rtol=1e-4)
    # bf16 autocast only perturbs the embeddings (bf16 keeps ~3 significant digits).
    low_precision = CircleEncoder(model, prep, grid=grid, radius=6.0, width=2.0, autocast=True)(images)
    assert low_precision.dtype == torch.float32
    assert (low_precision * circles).sum(dim=-1).min() > 0.99


def test_circle_encoder_rejects_bad_chunk(tiny_clip, clip_preprocess):
    with pytest.raises(ValueError, match="chunk"):
        CircleEncoder(tiny_clip, clip_preprocess, grid=3, radius=6.0, width=2.0, chunk=0)
