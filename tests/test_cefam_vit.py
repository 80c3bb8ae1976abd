"""ViT backbones for CE-FAM and the features stage: token outputs (B, N, C) become row-major patch
grids without the class and register tokens, Grad-CAM's total derivative flows through the grid,
and contributions run the tail on tokens rebuilt from masked maps."""

import pytest
import timm
import torch
from torch import nn

from lib.methods.cefam.association import class_contribution
from lib.methods.cefam.explain import ExplainSettings, explain_batch
from lib.methods.cefam.regions import concept_betas_total
from lib.methods.cefam.taps import grid_tail, tapped_forward, tapped_forward_with_prefixes
from lib.methods.cefam.translator import Translator
from lib.models.layers import extract_layers, split_at

LAYERS = ("blocks.0", "blocks.1")
SIDE, PATCH, WIDTH, REG = 32, 8, 16, 2  # a 4 x 4 patch grid; 1 class + 2 register tokens


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=SIDE, patch_size=PATCH, depth=2,
        embed_dim=WIDTH, num_heads=2, reg_tokens=REG,
    ).eval().requires_grad_(False)


class _PatchIndex(nn.Module):
    """In place of the patch embedding's conv: channel 0 of patch (i, j) holds i, channel 1 holds j."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        out = torch.zeros(b, WIDTH, h // PATCH, w // PATCH)
        out[:, 0] = torch.arange(h // PATCH, dtype=torch.float32)[:, None]
        out[:, 1] = torch.arange(w // PATCH, dtype=torch.float32)[None, :]
        return out


def test_token_grids_are_row_major_without_class_and_register_tokens():
    model = _vit()
    model.patch_embed.proj = _PatchIndex()
    model.pos_embed.zero_()
    model.cls_token.fill_(-1.0)
    model.reg_token.fill_(-2.0)
    model.blocks[0] = nn.Identity()  # blocks.0 passes the embedded tokens on unchanged
    x = torch.rand(2, 3, SIDE, SIDE)
    rows = torch.arange(4.0)[:, None].expand(4, 4)
    for grid in (extract_layers(model, x, ["blocks.0"])["blocks.0"], tapped_forward(model, x, ["blocks.0"])[1][0]):
        assert grid.shape == (2, WIDTH, 4, 4)  # 16 patches; the 3 prefix tokens are no location
        assert torch.equal(grid[:, 0], rows.expand(2, 4, 4)) and torch.equal(grid[:, 1], rows.T.expand(2, 4, 4))
        assert (grid >= 0).all()  # no class (-1) or register (-2) token in the grid
    _, _, (prefix,) = tapped_forward_with_prefixes(model, x, ["blocks.0"])
    assert prefix.shape == (2, 1 + REG, WIDTH) and torch.equal(prefix[:, 0], torch.full((2, WIDTH), -1.0))
    assert torch.equal(prefix[:, 1:], torch.full((2, REG, WIDTH), -2.0))
    # the features stage stores the class token beside the grid
    assert torch.equal(extract_layers(model, x, ["blocks.0"])["blocks.0.cls"], prefix[:, 0])


def _setup(n_concepts: int = 4):
    model = _vit()
    translator = Translator(2 * WIDTH, 12, hidden=(20,), scale=20.0).eval()
    g = torch.Generator().manual_seed(1)
    return model, translator, torch.rand(3, 3, SIDE, SIDE, generator=g), torch.randn(n_concepts, 12, generator=g)


def _hooked_betas(model, translator, x, text):
    """The authors' probe on a ViT: hooks keep each block's tokens as the network uses them, the
    grid is their patch part, and one backward per concept to the tokens gives the gradients."""
    tokens = {}
    handles = [dict(model.named_modules())[n].register_forward_hook(lambda m, a, o, n=n: tokens.__setitem__(n, o)) for n in LAYERS]
    with torch.enable_grad():
        model(x.clone().requires_grad_(True))
        for handle in handles:
            handle.remove()
        grids = [tokens[n][:, 1 + REG :].transpose(1, 2).reshape(x.shape[0], WIDTH, 4, 4) for n in LAYERS]
        scores = translator.scores(torch.cat([g.mean(dim=(2, 3)) for g in grids], dim=1), text)
        betas = [[] for _ in LAYERS]
        for t in range(text.shape[0]):
            grads = torch.autograd.grad(scores[:, t].sum(), [tokens[n] for n in LAYERS], retain_graph=True)
            for per_layer, g in zip(betas, grads, strict=True):
                per_layer.append(g[:, 1 + REG :].mean(dim=1))  # the patches' mean = the grid's spatial mean
    return [torch.stack(b, dim=1) for b in betas]


def test_vit_grad_cam_weights_are_the_total_derivative():
    model, translator, x, text = _setup()
    with torch.enable_grad():
        logits, maps = tapped_forward(model, x.clone().requires_grad_(True), LAYERS)
        total = concept_betas_total(translator, maps, text, chunk_size=3)
    torch.testing.assert_close(logits, model(x))  # the rebuilt tokens change nothing downstream
    reference = _hooked_betas(model, translator, x, text)
    for ours, ref in zip(total, reference, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    # blocks.0 feeds blocks.1: without the later path its betas would differ
    with torch.enable_grad():
        grids = [m.detach().requires_grad_(True) for m in maps]
        scores = translator.scores(torch.cat([g.mean(dim=(2, 3)) for g in grids], dim=1), text)
        pooled_only = torch.autograd.grad(scores[:, 0].sum(), grids[0])[0].mean(dim=(2, 3))
    assert not torch.allclose(pooled_only, total[0][:, 0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("layer", LAYERS)
def test_vit_tails_run_on_maps_with_their_prefix_tokens(layer):
    model, translator, x, text = _setup()
    tail = split_at(model, layer)[1]
    logits, (grid,), (prefix,) = tapped_forward_with_prefixes(model, x, [layer])
    run = grid_tail(tail, prefix)
    torch.testing.assert_close(run(grid), logits)
    # three copies per image, rows grouped by image: each copy gives its own image's logits
    copies = grid.repeat_interleave(3, dim=0)
    torch.testing.assert_close(run(copies), logits.repeat_interleave(3, dim=0))
    with pytest.raises(ValueError, match="copies per image"):
        run(grid[:2])


def test_explain_batch_on_a_vit():
    model, translator, x, text = _setup(n_concepts=5)
    tails = [split_at(model, layer)[1] for layer in LAYERS]
    settings = ExplainSettings(top_k=6, contribution_concepts=2, chunk=2)
    out = explain_batch(model, x, translator, text, LAYERS, [0, 1], tails, settings)
    assert [m.shape for m in out.maps] == [(3, 5, 4, 4)] * 2 and out.association.shape == (3, 5, 2)
    # a contribution by hand: image 0's top concept masked at its best layer, through the token tail
    logits, maps, prefixes = tapped_forward_with_prefixes(model, x, LAYERS)
    with torch.enable_grad():
        _, graph_maps = tapped_forward(model, x.clone().requires_grad_(True), LAYERS)
        betas = concept_betas_total(translator, graph_maps, text)
    t = int(out.presence[0].argmax())
    best = int(out.association[0, t].argmax())
    importance = betas[best][:1, t : t + 1] * maps[best][:1].mean(dim=(2, 3))[:, None]
    expected = class_contribution(
        grid_tail(tails[best], prefixes[best][:1]), maps[best][:1], importance, logits[:1].argmax(dim=1), k=6
    )[0, 0]
    torch.testing.assert_close(out.contribution[0, t], expected)
