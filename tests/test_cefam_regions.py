"""CE-FAM regions: Jacobian betas equal per-concept autograd Grad-CAM and pytorch-grad-cam's GradCAM."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from lib.methods.cefam.regions import (
    concept_betas,
    concept_betas_channels,
    concept_betas_total,
    concept_regions,
    default_tangent_chunk,
    default_total_chunk,
    pool_features,
    total_basis,
)
from lib.methods.cefam.taps import tapped_forward
from lib.methods.cefam.translator import Translator
from lib.toy.models.cnn import build_toy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
D = 6  # embedding width of the test translators


def _translator(in_dim: int, device: str = "cpu", seed: int = 0) -> Translator:
    torch.manual_seed(seed)
    return Translator(in_dim, D, hidden=(10, 8), scale=7.0, bias=0.3).to(device).eval()


def _gradcam_reference(translator, maps, text):
    """Grad-CAM done the slow way: leaf maps, S^t backward per concept, gradients averaged over space."""
    maps = [a.detach().clone().requires_grad_(True) for a in maps]
    z, _ = pool_features(maps)
    scores = translator.scores(torch.cat(z, dim=1), text)
    betas = [[] for _ in maps]
    for t in range(text.shape[0]):
        grads = torch.autograd.grad(scores[:, t].sum(), maps, retain_graph=True)
        for per_layer, g in zip(betas, grads):
            per_layer.append(g.mean(dim=(2, 3)))
    betas = [torch.stack(b, dim=1) for b in betas]  # (B, M, C_l)
    regions = [torch.relu((b[:, :, :, None, None] * a[:, None].detach()).sum(dim=2)) for b, a in zip(betas, maps)]
    return betas, regions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_concepts", [4, 9])  # M < D: Jacobian of the scores; M > D: of the embedding
def test_betas_and_regions_equal_per_concept_autograd(device, n_concepts):
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(3, 5, 4, 4, generator=gen).to(device), torch.randn(3, 7, 2, 3, generator=gen).to(device)]
    text = torch.randn(n_concepts, D, generator=gen).to(device)
    translator = _translator(12, device)
    z, hw = pool_features(maps)
    betas = concept_betas(translator, z, text, hw)
    ref_betas, ref_regions = _gradcam_reference(translator, maps, text)
    for ours, ref in zip(betas, ref_betas):
        assert ours.shape == ref.shape and ours.device.type == device and not ours.requires_grad
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    for ours, ref in zip(concept_regions(betas, maps), ref_regions):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    # (H, W) pairs work as well as pixel counts; chunked jacrev gives the same
    again = concept_betas(translator, z, text, [(4, 4), (2, 3)], chunk_size=2)
    for a, b in zip(again, betas):
        torch.testing.assert_close(a, b)


def test_regions_cast_fp16_maps_and_check_lengths():
    betas = [torch.ones(1, 2, 3)]
    maps = [torch.ones(1, 3, 2, 2, dtype=torch.float16)]
    (region,) = concept_regions(betas, maps)
    assert region.dtype == torch.float32 and torch.equal(region, torch.full((1, 2, 2, 2), 3.0))
    with pytest.raises(ValueError, match="one entry per layer"):
        concept_regions(betas, maps * 2)
    with pytest.raises(ValueError, match="one length"):
        concept_betas(_translator(3), [torch.zeros(1, 3)], torch.zeros(2, D), [4, 4])


class _Backbone(nn.Module):
    """Two stride-1 conv stages (layer1 feeds layer2), the CE-FAM branch on both pooled maps and
    the concept scores as outputs: stride 1 keeps the maps at input size, so GradCAM's resize
    to the input is the identity."""

    def __init__(self, text: torch.Tensor, dim: int = D) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layer1 = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(5, 7, 3, padding=1), nn.ReLU())
        self.translator = Translator(12, dim, hidden=(10,), scale=7.0)
        self.register_buffer("text", text)
        self.eval()

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        a1 = self.layer1(x)
        return [a1, self.layer2(a1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = pool_features(self.maps(x))
        return self.translator.scores(torch.cat(z, dim=1), self.text)


def _total_reference(model, x):
    """Per-concept backward through the backbone: the authors' BaseCAM gradient (total derivative)."""
    maps = model.maps(x.requires_grad_(True))
    z, _ = pool_features(maps)
    scores = model.translator.scores(torch.cat(z, dim=1), model.text)
    out = [[] for _ in maps]
    for t in range(scores.shape[1]):
        for per_layer, g in zip(out, torch.autograd.grad(scores[:, t].sum(), maps, retain_graph=True)):
            per_layer.append(g.mean(dim=(2, 3)))
    return [torch.stack(b, dim=1) for b in out], [a.detach() for a in maps]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("n_concepts", "dim", "basis"),
    # rows backpropagated: M scores (M <= D, C), D embedding coordinates (D < M, D <= C = 12), or C pooled channels
    [(3, D, "scores"), (8, D, "embedding"), (20, 16, "pools")],
)
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_total_betas_equal_per_concept_backward_through_the_backbone(device, n_concepts, dim, basis, chunk_size):
    gen = torch.Generator().manual_seed(4)
    model = _Backbone(torch.randn(n_concepts, dim, generator=gen), dim).to(device)
    x = torch.randn(2, 3, 6, 6, generator=gen).to(device)
    ref, maps = _total_reference(model, x.clone())
    assert total_basis(n_concepts, dim, 12) == basis
    total = concept_betas_total(model.translator, model.maps(x.clone().requires_grad_(True)), model.text, chunk_size=chunk_size)
    for ours, r in zip(total, ref):
        assert ours.shape == r.shape and not ours.requires_grad
        torch.testing.assert_close(ours, r, rtol=1e-5, atol=1e-5)
    # the translator-only betas agree on the last layer; on layer1 they miss the path through layer2
    z, hw = pool_features(maps)
    direct = concept_betas(model.translator, z, model.text, hw)
    torch.testing.assert_close(direct[1], total[1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(direct[0], total[0], rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="autograd graph"):
        concept_betas_total(model.translator, maps, model.text)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_forward_mode_betas_equal_per_concept_backward(device, chunk_size):
    """8 concepts, D = 6 < C = 12: backward would take 6 embedding rows, forward 5 layer1 channels."""
    gen = torch.Generator().manual_seed(4)
    model = _Backbone(torch.randn(8, D, generator=gen)).to(device)
    x = torch.randn(2, 3, 6, 6, generator=gen).to(device)
    ref, maps = _total_reference(model, x.clone())
    assert total_basis(8, D, 12) == "embedding" and total_basis(8, D, 12, tangents=5) == "channels"
    for detached in (True, False):  # the forward basis needs no graph on the maps
        given = maps if detached else model.maps(x.clone().requires_grad_(True))
        total = concept_betas_total(model.translator, given, model.text, chunk_size, backbone=(model, x, ["layer1", "layer2"]))
        for ours, r in zip(total, ref, strict=True):
            assert ours.shape == r.shape and not ours.requires_grad and ours.device.type == device
            torch.testing.assert_close(ours, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["cnn", "bcos"])  # bcos: MaxOut, |cos| scaling and patch norms under forward AD + vmap
def test_forward_mode_betas_equal_per_concept_backward_on_the_toy_backbones(device, arch):
    torch.manual_seed(6)
    layers = ["layer1", "layer2", "layer3"]
    model = build_toy(arch, 4).to(device).eval().requires_grad_(False)
    translator = _translator(32 + 64 + 128, device)
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 32, 32, generator=gen).to(device)
    text = torch.randn(5, D, generator=gen).to(device)
    maps = tapped_forward(model, x.clone().requires_grad_(True), layers)[1]
    scores = translator.scores(torch.cat(pool_features(maps)[0], dim=1), text)
    ref = [torch.stack(per_layer, dim=1) for per_layer in zip(*[
        [g.mean(dim=(2, 3)) for g in torch.autograd.grad(scores[:, t].sum(), maps, retain_graph=True)] for t in range(text.shape[0])
    ])]
    ours = concept_betas_channels(model, x, layers, translator, maps, text, chunk_size=24)
    for o, r in zip(ours, ref, strict=True):
        assert o.shape == r.shape == (2, 5, o.shape[2])
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


def test_total_basis_and_chunk_defaults():
    assert [total_basis(*rows) for rows in [(5, 5, 5), (6, 5, 5), (6, 5, 4), (4000, 512, 224), (4000, 512, 3840)]] == [
        "scores", "embedding", "pools", "pools", "embedding",
    ]
    # forward mode only with strictly fewer JVPs than backward rows (the regions stage: 17 concepts, 96 tangents)
    assert [total_basis(*rows) for rows in [(100, 512, 224, 96), (4000, 512, 224, 96), (96, 512, 224, 96), (17, 512, 224, 96)]] == [
        "channels", "channels", "scores", "scores",
    ]
    assert default_total_chunk([torch.zeros(1, 2, 3, 3)]) == 1  # CPU: plain backward per row
    assert default_tangent_chunk([torch.zeros(8, 224, 32, 32)]) == 24  # CPU: 512 MiB at 3 map-sized buffers a row
    with pytest.raises(ValueError, match="chunk_size"):
        concept_betas_total(_translator(3), [torch.zeros(1, 3, 2, 2, requires_grad=True)], torch.zeros(2, D), chunk_size=0)


def _min_max(cam: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scaling: scale_cam_image (x - min) / (1e-7 + max) without the resize,
    applied twice as GradCAM does (per layer, then after aggregating the layers)."""
    for _ in range(2):
        cam = cam - cam.min(axis=(1, 2), keepdims=True)
        cam = cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))
    return cam


def test_regions_equal_pytorch_grad_cam_on_the_concept_score():
    gen = torch.Generator().manual_seed(5)
    n_concepts = 4
    model = _Backbone(torch.randn(n_concepts, D, generator=gen))
    x = torch.randn(3, 3, 8, 8, generator=gen)
    maps = [a.detach() for a in model.maps(x)]
    z, hw = pool_features(maps)
    # last layer: it reaches the scores only through its pool, so the translator-only betas are Grad-CAM's
    direct = concept_regions(concept_betas(model.translator, z, model.text, hw), maps)
    # layer1 also feeds layer2: GradCAM there takes the total derivative
    total = concept_regions(concept_betas_total(model.translator, model.maps(x.clone().requires_grad_(True)), model.text), maps)
    for layer, ours in [(model.layer2, direct[1]), (model.layer1, total[0])]:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for t in range(n_concepts):
                theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(t)] * x.shape[0])
                np.testing.assert_allclose(_min_max(ours[:, t].numpy()), theirs, rtol=0, atol=1e-6)
