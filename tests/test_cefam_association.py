"""CE-FAM association scores and class contributions: hand-built cases and a slow reference."""

import math

import pytest
import torch
from torch import nn

from lib.methods.cefam.association import (
    association_scores,
    best_layer,
    candidate_layers,
    channel_importance,
    class_contribution,
    class_masking_curves,
    curve_area,
    masking_curves,
)
from lib.methods.cefam.regions import concept_betas
from lib.methods.cefam.translator import Translator, concept_scores

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _identity_translator(dim: int, device: str = "cpu") -> Translator:
    """h(z) = z, scores = cos(z, t) (scale 1, bias 0)."""
    model = Translator(dim, dim, hidden=(), scale=1.0, bias=0.0)
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.eye(dim))
        model.layers[0].bias.zero_()
    return model.to(device).eval()


def test_curve_area_rules():
    drops = torch.tensor([[0.0, 1.0, 2.0], [0.0, -1.0, 0.0]])
    torch.testing.assert_close(curve_area(drops, "trapezoid"), torch.tensor([0.5 * (1 + 2 / 2), 0.5 * -1]))
    torch.testing.assert_close(curve_area(drops, "right"), torch.tensor([(1 + 2) / 2, -1 / 2]))  # the authors' sum
    torch.testing.assert_close(curve_area(drops), curve_area(drops, "right"))  # the authors' is the default
    with pytest.raises(ValueError, match="rule"):
        curve_area(drops, "left")
    with pytest.raises(ValueError, match="at least 2 points"):
        curve_area(torch.zeros(3, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_linear_translator_hand_computed(device):
    # layer 1 = channels (3, 1), layer 2 = channels (2, 1); h = identity; S = cos(z, e0)
    z_list = [torch.tensor([[3.0, 1.0]], device=device), torch.tensor([[2.0, 1.0]], device=device)]
    text = torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=device)
    translator = _identity_translator(4, device)
    betas = concept_betas(translator, z_list, text, [1, 1])
    # dS/dz_k = (d_k0 |z|^2 - z_0 z_k) / |z|^3, |z|^2 = 15: beta*z = (18, -3) / 15^1.5 and (-12, -3) / 15^1.5
    importance = channel_importance(betas, z_list)
    torch.testing.assert_close(importance[0][0, 0], torch.tensor([18.0, -3.0], device=device) / 15**1.5)
    torch.testing.assert_close(importance[1][0, 0], torch.tensor([-12.0, -3.0], device=device) / 15**1.5)
    # layer 1: m = 2; channel 0 first -> (2,1,2,1), then channel 1 -> (2,2,2,1)
    # layer 2: m = 1.5; channel 3 first (-3 > -12) -> (3,1,2,1.5), then channel 2 -> (3,1,1.5,1.5)
    s0 = 3 / math.sqrt(15)
    layer1 = [0.0, s0 - 2 / math.sqrt(10), s0 - 2 / math.sqrt(13)]
    layer2 = [0.0, s0 - 3 / math.sqrt(16.25), s0 - 3 / math.sqrt(14.5)]  # the last step raises S: a negative drop
    curves = masking_curves(translator, z_list, text, betas, k=2, score="cosine", relative=False)
    torch.testing.assert_close(curves[0][0, 0], torch.tensor(layer1, device=device))
    torch.testing.assert_close(curves[1][0, 0], torch.tensor(layer2, device=device))
    scores = association_scores(translator, z_list, text, betas, k=2, score="cosine", relative=False, rule="trapezoid")
    expected = [(a[1] + a[2] / 2) / 2 for a in (layer1, layer2)]
    torch.testing.assert_close(scores, torch.tensor([[expected]], device=device))
    right = association_scores(translator, z_list, text, betas, k=2, score="cosine", relative=False)  # default: the authors' sum
    torch.testing.assert_close(right, torch.tensor([[[(a[1] + a[2]) / 2 for a in (layer1, layer2)]]], device=device))
    assert best_layer(scores).tolist() == [[0]]
    # per-channel fill values (e.g. dataset means) replace the image's channel mean
    zero = [torch.zeros(2, device=device)] * 2
    curves = masking_curves(translator, z_list, text, betas, k=2, fill=zero, score="cosine", relative=False)
    torch.testing.assert_close(curves[0][0, 0], torch.tensor([0.0, s0, s0], device=device))  # S = 0 once z_0 = 0
    # k beyond the channel count is capped per layer
    assert masking_curves(translator, z_list, text, betas, k=20, score="cosine")[0].shape == (1, 1, 3)


def _slow_curves(translator, z_list, text, betas, k, fill, score, relative):
    """One masked z_cat at a time, following the paper's recipe literally."""
    sizes = [z.shape[1] for z in z_list]
    out = []
    for layer, (z, beta) in enumerate(zip(z_list, betas)):
        offset = sum(sizes[:layer])
        per_image = []
        for b in range(z.shape[0]):
            per_concept = []
            for t in range(text.shape[0]):
                order = (beta[b, t] * z[b]).argsort(descending=True)[:k]
                value = z[b].mean() if fill is None else None
                values = []
                for j in range(k + 1):
                    z_cat = torch.cat([zz[b] for zz in z_list]).clone()
                    for c in order[:j]:
                        z_cat[offset + c] = value if fill is None else fill[layer][c]
                    s = concept_scores(translator(z_cat[None]), text, translator.scale, translator.bias)[0]
                    s = {"softmax": s.softmax(-1), "sigmoid": s.sigmoid(), "cosine": s}[score][t]
                    values.append(s)
                values = torch.stack(values)
                drop = values[0] - values
                per_concept.append(drop / values[0] if relative else drop)
            per_image.append(torch.stack(per_concept))
        out.append(torch.stack(per_image))
    return out


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "cosine"])
@pytest.mark.parametrize("with_fill", [False, True])
def test_batched_curves_equal_a_slow_reference(score, with_fill):
    # float64: relative drops of small probabilities magnify float32 rounding
    gen = torch.Generator().manual_seed(0)
    z_list = [torch.rand(2, 5, generator=gen, dtype=torch.float64), torch.rand(2, 7, generator=gen, dtype=torch.float64)]
    text = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    translator = Translator(12, 4, hidden=(8,), scale=20.0, bias=-1.0).double().eval()
    betas = concept_betas(translator, z_list, text, [9, 4])
    fill = [torch.rand(5, generator=gen, dtype=torch.float64), torch.rand(7, generator=gen, dtype=torch.float64)] if with_fill else None
    relative = score != "cosine"
    ours = masking_curves(translator, z_list, text, betas, k=3, fill=fill, score=score, relative=relative)
    with torch.no_grad():
        ref = _slow_curves(translator, z_list, text, betas, 3, fill, score, relative)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    # chunks of concepts and a subset of concepts give the same rows
    chunked = masking_curves(translator, z_list, text, betas, k=3, fill=fill, score=score, relative=relative, chunk=4)
    subset = masking_curves(translator, z_list, text, betas, k=3, fill=fill, score=score, relative=relative, concepts=torch.tensor([4, 1]))
    for a, c, s in zip(ours, chunked, subset):
        torch.testing.assert_close(c, a)
        torch.testing.assert_close(s, a[:, [4, 1]])
    scores = association_scores(translator, z_list, text, betas, k=3, fill=fill, score=score, relative=relative, rule="right")
    assert scores.shape == (2, 6, 2)
    torch.testing.assert_close(scores[..., 1], ref[1][..., 1:].sum(-1) / 3)


def test_best_and_candidate_layers():
    scores = torch.tensor([[[0.1, 0.5, 0.3, 0.2, 0.0]]])
    assert best_layer(scores).tolist() == [[1]]
    assert candidate_layers(scores).tolist() == [[[1, 2, 3, 0]]]
    assert candidate_layers(scores[..., :2]).tolist() == [[[1, 0]]]


def _softmax_tail(weight: torch.Tensor):
    fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        fc.weight.copy_(weight)
    return fc


def test_class_contribution_hand_computed():
    # pooled z = (1, 2, 4); classes: logit0 = z0 + z1 + z2, logit1 = 0, so p0 = sigmoid(z0 + z1 + z2)
    x = torch.tensor([[1.0, 2.0, 4.0]])
    tail = _softmax_tail(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    # concept 0 ranks channels 2, 1, 0; concept 1 ranks channel 0 first
    importance = torch.tensor([[[0.1, 0.2, 0.3], [0.9, 0.2, 0.1]]])
    target = torch.tensor([0])

    def p0(z0, z1, z2):
        return 1 / (1 + math.exp(-(z0 + z1 + z2)))

    m = 7 / 3  # the image's mean over channels
    base = p0(1, 2, 4)
    concept0 = [p0(1, 2, 4), p0(1, 2, m), p0(1, m, m)]
    # concept 1: channel 0 first, then the larger of channels 1 (0.2) and 2 (0.1): channel 1
    concept1 = [p0(1, 2, 4), p0(m, 2, 4), p0(m, m, 4)]
    expected = torch.tensor([[[(base - v) / base for v in concept0], [(base - v) / base for v in concept1]]])
    curves = class_masking_curves(tail, x, importance, target, k=2)
    torch.testing.assert_close(curves, expected.float())
    contribution = class_contribution(tail, x, importance, target, k=2)
    torch.testing.assert_close(contribution, curve_area(expected.float()))
    # concept 0 first lowers channel 2 to the mean (p0 falls); concept 1 raises channel 0 (p0 rises): negative
    assert contribution[0, 0] > 0 and contribution[0, 1] < 0


@pytest.mark.parametrize("device", DEVICES)
def test_class_contribution_on_maps_equals_pooled_for_an_avgpool_head(device):
    gen = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 6, 4, 5, generator=gen).to(device)
    importance = torch.randn(3, 4, 6, generator=gen).to(device)
    target = torch.tensor([0, 2, 1], device=device)
    torch.manual_seed(0)
    fc = nn.Linear(6, 3).to(device)

    def head(a):  # the backbone's tail from the maps: global average pool, then the classifier
        return fc(a.mean(dim=(2, 3)))

    pooled = maps.mean(dim=(2, 3))
    for fill in (None, torch.rand(6, generator=gen).to(device)):
        on_maps = class_contribution(head, maps, importance, target, k=4, fill=fill)
        on_pooled = class_contribution(fc, pooled, importance, target, k=4, fill=fill)
        torch.testing.assert_close(on_maps, on_pooled, rtol=1e-5, atol=1e-6)
        chunked = class_contribution(head, maps, importance, target, k=4, fill=fill, chunk=3)
        torch.testing.assert_close(chunked, on_maps)
    # the authors' masking before the last layer keeps each channel's mean: an avgpool head sees nothing
    spatial = class_contribution(head, maps, importance, target, k=4, fill="spatial")
    torch.testing.assert_close(spatial, torch.zeros_like(spatial), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="spatial"):
        class_contribution(fc, pooled, importance, target, fill="spatial")
    # raw logits, absolute drops: a linear head drops by W[c, k] (z_k - m) for the first channel
    logit = class_masking_curves(fc, pooled, importance, target, k=2, prob="logit", relative=False)
    first = importance.argmax(dim=2)  # (B, M)
    m = pooled.mean(dim=1, keepdim=True)
    weight = fc.weight.detach()[target][:, None, :].expand(-1, 4, -1).gather(2, first[..., None])[..., 0]
    expected = weight * (pooled.gather(1, first) - m)
    torch.testing.assert_close(logit[..., 1], expected, rtol=1e-5, atol=1e-6)
    assert logit.shape == (3, 4, 3) and (logit[..., 0] == 0).all()


def test_bad_arguments_raise():
    z_list = [torch.rand(1, 3)]
    translator = Translator(3, 2, hidden=())
    betas = [torch.rand(1, 2, 3)]
    text = torch.rand(2, 2)
    with pytest.raises(ValueError, match="score must be"):
        masking_curves(translator, z_list, text, betas, score="logit")
    with pytest.raises(ValueError, match="k must be"):
        masking_curves(translator, z_list, text, betas, k=0)
    with pytest.raises(ValueError, match="fill must have shape"):
        masking_curves(translator, z_list, text, betas, fill=[torch.zeros(4)])
    with pytest.raises(ValueError, match="importance must have shape"):
        class_contribution(nn.Linear(3, 2), torch.rand(1, 3), torch.rand(1, 2, 4), torch.tensor([0]))
