"""CE-FAM on a real (toy) backbone: tapped activation maps, total-derivative Grad-CAM, contributions."""

import pytest
import torch
from torch import nn

from lib.methods.cefam.association import association_scores, class_contribution, curve_area
from lib.methods.cefam.explain import ExplainSettings, explain_batch, explain_details, top_contributions
from lib.methods.cefam.regions import concept_betas, concept_betas_total, concept_regions, pool_features
from lib.methods.cefam.taps import tapped_forward
from lib.methods.cefam.translator import Translator
from lib.models.layers import extract_layers, split_at
from lib.toy.models.cnn import build_toy

LAYERS = ("layer1", "layer2", "layer3")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _setup(arch: str, device: str = "cpu", n_concepts: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = build_toy(arch, 4).to(device).eval().requires_grad_(False)
    translator = Translator(32 + 64 + 128, 16, hidden=(24,), scale=20.0).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, 32, 32, generator=g).to(device)
    text = torch.randn(n_concepts, 16, generator=g).to(device)
    return model, translator, x, text


def _authors_betas(model, translator, x, text):
    """The authors' BaseCAM: forward hooks keep each layer's output as the network uses it, z_cat is
    pooled from those, and one backward of S^t per concept gives the gradients at the outputs."""
    outputs = {}
    handles = [dict(model.named_modules())[n].register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o)) for n in LAYERS]
    with torch.enable_grad():
        model(x.clone().requires_grad_(True))
        for h in handles:
            h.remove()
        maps = [outputs[n] for n in LAYERS]
        scores = translator.scores(torch.cat([a.mean(dim=(2, 3)) for a in maps], dim=1), text)
        betas = [[] for _ in LAYERS]
        for t in range(text.shape[0]):
            for per_layer, g in zip(betas, torch.autograd.grad(scores[:, t].sum(), maps, retain_graph=True)):
                per_layer.append(g.mean(dim=(2, 3)))
    return [torch.stack(b, dim=1) for b in betas]


@pytest.mark.parametrize("arch", ["cnn", "bcos"])
@pytest.mark.parametrize("device", DEVICES)
def test_tapped_maps_give_the_authors_total_derivative(arch, device):
    model, translator, x, text = _setup(arch, device)
    with torch.enable_grad():
        logits, maps = tapped_forward(model, x.clone().requires_grad_(True), LAYERS)
        total = concept_betas_total(translator, maps, text, chunk_size=2)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
        for a, b in zip(maps, extract_layers(model, x, LAYERS).values()):
            torch.testing.assert_close(a, b)
    for ours, ref in zip(total, _authors_betas(model, translator, x, text)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    # the translator-only Jacobian is exact for the last layer and misses the later layers' paths before it
    z, hw = pool_features([a.detach() for a in maps])
    direct = concept_betas(translator, z, text, hw)
    torch.testing.assert_close(direct[2], total[2], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(direct[0], total[0], rtol=1e-3, atol=1e-6)


def test_taps_keep_maps_that_later_in_place_ops_would_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    out, (conv,) = tapped_forward(model, x, ["0"])
    torch.testing.assert_close(conv, model[0](x))
    assert (conv < 0).any()  # the in-place ReLU acted on the clone the network saw
    torch.testing.assert_close(out, model(x))
    with pytest.raises(ValueError, match="not found"):
        tapped_forward(model, x, ["9"])
    with pytest.raises(ValueError, match="activation maps"):
        tapped_forward(nn.Sequential(nn.Flatten(), nn.Linear(108, 2)), x, ["1"])


def test_top_contributions_mask_each_concept_at_its_best_layer():
    model, translator, x, text = _setup("cnn", n_concepts=4)
    with torch.no_grad():
        _, maps = tapped_forward(model, x, LAYERS)
    z, hw = pool_features(maps)
    betas = concept_betas(translator, z, text, hw)
    importance = [b * zz[:, None] for b, zz in zip(betas, z)]
    tails = [split_at(model, layer)[1] for layer in LAYERS]
    best = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0], [1, 0, 0, 2]])
    top = torch.tensor([[0, 1], [1, 3], [2, 3]])
    target = torch.tensor([0, 3, 1])
    fills = [None, "spatial", None]
    out = top_contributions(tails, maps, importance, best, top, target, k=5, fills=fills, chunk=1)
    expected = torch.zeros(3, 4)
    for b in range(3):
        for t in top[b].tolist():
            layer = int(best[b, t])
            expected[b, t] = class_contribution(
                tails[layer], maps[layer][b : b + 1], importance[layer][b : b + 1, t : t + 1], target[b : b + 1], k=5, fill=fills[layer]
            )[0, 0]
    torch.testing.assert_close(out, expected)
    assert (out[expected == 0] == 0).all() and (out != 0).sum() == 6


@pytest.mark.parametrize("beta", ["total", "jacobian"])
def test_explain_batch_is_the_sum_of_its_parts(beta):
    model, translator, x, text = _setup("cnn", n_concepts=6, seed=1)
    settings = ExplainSettings(beta=beta, top_k=8, contribution_concepts=2, chunk=4)
    explained = [0, 2]  # layer1 and layer3
    tails = [split_at(model, LAYERS[i])[1] for i in explained]
    out = explain_batch(model, x, translator, text, LAYERS, explained, tails, settings)
    with torch.enable_grad():
        _, maps = tapped_forward(model, x.clone().requires_grad_(True), LAYERS)
        betas = concept_betas_total(translator, maps, text) if beta == "total" else None
    maps = [a.detach() for a in maps]
    z, hw = pool_features(maps)
    betas = betas or concept_betas(translator, z, text, hw)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x))
        torch.testing.assert_close(out.presence, translator.scores(torch.cat(z, dim=1), text))
    scores = association_scores(translator, z, text, betas, 8)
    torch.testing.assert_close(out.association, scores[..., explained])
    for ours, ref in zip(out.maps, concept_regions([betas[i] for i in explained], [maps[i] for i in explained])):
        torch.testing.assert_close(ours, ref)
    top = out.presence.topk(2, dim=1).indices
    computed = torch.zeros_like(out.contribution, dtype=torch.bool).scatter_(1, top, True)
    assert (out.contribution[~computed] == 0).all() and (out.contribution[computed] != 0).any()


def test_negative_contributions_are_dropped_by_default_and_kept_on_request():
    model, translator, x, text = _setup("cnn", n_concepts=6, seed=2)
    tails = [split_at(model, layer)[1] for layer in LAYERS]

    def least_likely(logits):  # masking the evidence of the prediction raises this class: negative contributions
        return logits.argmin(dim=1)

    runs = {}
    for negatives in ("keep", "drop"):
        settings = ExplainSettings(beta="jacobian", top_k=8, contribution_concepts=4, negatives=negatives, chunk=4)
        runs[negatives] = explain_batch(model, x, translator, text, LAYERS, [0, 1, 2], tails, settings, least_likely).contribution
    assert (runs["keep"] < 0).any(), "the case must have negative contributions to test dropping them"
    torch.testing.assert_close(runs["drop"], runs["keep"].clamp(min=0))
    assert ExplainSettings().negatives == "drop" and ExplainSettings().contribution_concepts == 8


@pytest.mark.parametrize("fill", ["mean", "spatial"])
def test_figure_details_are_the_curves_behind_the_contributions_and_the_class_grad_cam(fill):
    model, translator, x, text = _setup("cnn", n_concepts=6, seed=2)
    settings = ExplainSettings(top_k=8, contribution_concepts=3, contribution_fill=fill, rule="right", chunk=4)
    explained = [0, 1, 2]
    tails = [split_at(model, layer)[1] for layer in LAYERS]
    out = explain_batch(model, x, translator, text, LAYERS, explained, tails, settings)
    image = 1
    concepts = out.presence[image].topk(3).indices
    best = out.association[image, concepts].argmax(dim=-1)
    details = explain_details(model, x[image : image + 1], translator, text, LAYERS, explained, tails, settings, concepts, best)
    # each curve's area is the stored contribution of its concept
    areas = torch.stack([curve_area(c[None], "right")[0] for c in details.class_curves])
    torch.testing.assert_close(areas, out.contribution[image, concepts])
    assert [len(c) for c in details.class_curves] == [9, 9, 9]
    # the class Grad-CAM at layer3: ReLU(sum_k mean(d logit_c / d A_k) A_k) with A_k captured by a hook
    captured = {}
    handle = model.layer3.register_forward_hook(lambda m, a, o: captured.setdefault("a", o))
    with torch.enable_grad():
        logits = model(x[image : image + 1].clone().requires_grad_(True))
        handle.remove()
        grad = torch.autograd.grad(logits[0, logits[0].argmax()], captured["a"])[0]
    expected = (grad.mean(dim=(2, 3), keepdim=True) * captured["a"]).sum(dim=1).relu()[0]
    torch.testing.assert_close(details.class_cam, expected)
