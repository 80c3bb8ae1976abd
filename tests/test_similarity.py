"""Spatial concept similarity P and the circles/concepts compatibility check."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from lib.core.errors import UserError
from lib.core.schema import CLIP_MODEL_KEY, EMBED_DIM_KEY, check_compatible, clip_provenance
from lib.kernels.rings import CircleEncoder, grid_centers, ring_alpha
from lib.kernels.similarity import similarity_batch
from lib.kernels.text import encode_texts

RED = (255, 0, 0)


def test_similarity_batch_hand_computed():
    circle = torch.zeros(1, 1, 2, 2)
    circle[0, 0, 0] = torch.tensor([2.0, 0.0])  # not unit: similarity_batch normalises
    circle[0, 0, 1] = torch.tensor([0.5, 0.5 * math.sqrt(3)])  # 60 degrees from x
    text = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    p = similarity_batch(circle, text)
    assert p.shape == (1, 2, 1, 2) and p.dtype == torch.float32
    torch.testing.assert_close(p[0, :, 0], torch.tensor([[1.0, 0.5], [0.0, math.sqrt(3) / 2]]))


def test_similarity_batch_matches_einsum_on_fp16_inputs():
    gen = torch.Generator().manual_seed(0)
    circle = F.normalize(torch.randn(3, 4, 4, 16, generator=gen), dim=-1).half()
    text = F.normalize(torch.randn(5, 16, generator=gen), dim=-1).half()
    expected = torch.einsum(
        "bhwd,md->bmhw", F.normalize(circle.float(), dim=-1), F.normalize(text.float(), dim=-1)
    )
    torch.testing.assert_close(similarity_batch(circle, text), expected)


def test_p_equals_direct_per_variant_computation(tiny_clip, clip_preprocess):
    """P from the batched encoder + one matmul == per variant: draw, encode, normalise, dot."""
    model, prep, tokenizer = tiny_clip, clip_preprocess, SimpleTokenizer(context_length=16)
    size, grid, radius, width = prep.size, 3, 6.0, 2.0
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=gen)
    text = encode_texts(model, tokenizer, ["a star", "a blue", "a grass"])
    circles = CircleEncoder(model, prep, grid, radius, width, chunk=64, autocast=False)(images)
    p = similarity_batch(circles, text)
    assert p.shape == (2, 3, grid, grid)

    alpha = ring_alpha(size, grid_centers(size, grid), radius, width)
    color = prep.normalise_color(RED).view(3, 1, 1)
    with torch.no_grad():
        tokens = model.encode_text(tokenizer(["a star", "a blue", "a grass"]))
        for n in range(2):
            x = prep(images[n : n + 1])[0]
            for h in range(grid):
                for w in range(grid):
                    a = alpha[h * grid + w]
                    img = model.encode_image((x * (1 - a) + color * a)[None])[0]
                    direct = F.cosine_similarity(img[None], tokens, dim=-1)
                    torch.testing.assert_close(p[n, :, h, w], direct, atol=1e-5, rtol=1e-4)


def test_similarity_batch_rejects_mismatched_dims():
    with pytest.raises(ValueError, match=r"text_emb must have shape \(M, 8\)"):
        similarity_batch(torch.zeros(1, 2, 2, 8), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"circle_emb must have shape \(B, G, G, D\)"):
        similarity_batch(torch.zeros(2, 8), torch.zeros(3, 8))


def test_check_compatible():
    attrs = {**clip_provenance("toy-clip@abc", 64), "stage": "circles"}
    check_compatible(attrs, clip_provenance("toy-clip@abc", 64))
    with pytest.raises(UserError, match="model_id = 'toy-clip@abc' \\(circles\\) vs 'ViT-B-16'"):
        check_compatible(attrs, {**attrs, CLIP_MODEL_KEY: "ViT-B-16"})
    with pytest.raises(UserError, match="embed_dim = 64 \\(circles\\) vs 512"):
        check_compatible(attrs, {**attrs, EMBED_DIM_KEY: 512})
    with pytest.raises(UserError, match="concepts store attributes lack 'embed_dim'"):
        check_compatible(attrs, {CLIP_MODEL_KEY: "toy-clip@abc"})
    with pytest.raises(UserError, match="circles store attributes lack 'model_id'"):
        check_compatible({EMBED_DIM_KEY: 64}, attrs)
