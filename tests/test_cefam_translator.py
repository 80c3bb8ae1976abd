"""CE-FAM translator: default widths, architecture, concept scores and the training loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from lib.methods.cefam.translator import (
    Translator,
    concept_scores,
    default_hidden,
    embedding_loss,
    similarity_loss,
    translator_loss,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_default_hidden_reproduces_the_paper_for_resnet50_and_scales():
    assert default_hidden(3840, 512) == (2048, 1024)  # App. A.2
    assert default_hidden(960, 512) == (1024, 512)  # ResNet-18 into CLIP
    assert default_hidden(3840, 512, n_hidden=0) == ()
    assert default_hidden(3840, 512, n_hidden=1) == (1024,)  # sqrt(3840 * 512) = 1402 -> 2^10
    with pytest.raises(ValueError, match="in_dim and out_dim"):
        default_hidden(0, 512)


def test_translator_layers_and_forward():
    model = Translator(3840, 512)
    assert [(layer.in_features, layer.out_features) for layer in model.layers] == [(3840, 2048), (2048, 1024), (1024, 512)]
    small = Translator(6, 3, hidden=(5, 4))
    z = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    l1, l2, l3 = small.layers
    expected = l3(torch.tanh(l2(torch.tanh(l1(z)))))  # tanh after hidden layers, linear output
    torch.testing.assert_close(small(z), expected)
    assert Translator(6, 3, hidden=()).layers[0].in_features == 6  # a single linear map
    with pytest.raises(ValueError, match="must be >= 1"):
        Translator(6, 3, hidden=(0,))


def test_concept_scores_are_the_scaled_cosine():
    emb = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # normalised inside
    scores = concept_scores(emb, text, scale=10.0, bias=-1.0)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[0.6, 0.8, 0.6 * s + 0.8 * s], [0.0, -1.0, -s]]) * 10 - 1
    torch.testing.assert_close(scores, expected)


def test_scale_and_bias_travel_with_the_state_dict():
    model = Translator(4, 2, hidden=(3,), scale=117.3, bias=-12.9)
    copy = Translator(4, 2, hidden=(3,))
    copy.load_state_dict(model.state_dict())
    assert copy.scale.item() == pytest.approx(117.3) and copy.bias.item() == pytest.approx(-12.9)
    z, text = torch.randn(2, 4), torch.randn(5, 2)
    torch.testing.assert_close(copy.scores(z, text), concept_scores(model(z), text, 117.3, -12.9))


def test_translator_loss_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    text = torch.tensor([[3.0, 0.0]])
    # L_emb: squared errors 1, 1, 0, 0 -> 0.5. Scores (scale 10): pred [10, 0], target [0, 0] -> L_sim = 50
    assert embedding_loss(pred, target).item() == pytest.approx(0.5)
    assert similarity_loss(pred, target, text, scale=10.0).item() == pytest.approx(50.0)
    assert translator_loss(pred, target, text, lam=0.5, scale=10.0).item() == pytest.approx(0.5 + 0.5 * 50)
    # lam = 0: the concept-free variant needs no text embeddings
    assert translator_loss(pred, target, None, lam=0.0).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="text_emb is required"):
        translator_loss(pred, target, None)
    with pytest.raises(ValueError, match="same shape"):
        translator_loss(pred, target[:1], text)


@pytest.mark.parametrize("device", DEVICES)
def test_translator_loss_matches_the_authors_form_and_trains(device):
    gen = torch.Generator().manual_seed(1)
    z, target, text = torch.randn(16, 12, generator=gen), torch.randn(16, 8, generator=gen), torch.randn(5, 8, generator=gen)
    z, target, text = z.to(device), target.to(device), text.to(device)
    torch.manual_seed(0)
    model = Translator(12, 8, hidden=(16,)).to(device)
    pred = model(z)
    # the authors: normalised image and text embeddings, bmm, times exp(logit_scale) (train.py, converter.py)
    t = F.normalize(text, dim=-1)
    s_pred = F.normalize(pred, dim=-1) @ t.T * 100
    s_clip = F.normalize(target, dim=-1) @ t.T * 100
    expected = F.mse_loss(pred, target) + 1e-3 * F.mse_loss(s_pred, s_clip)
    torch.testing.assert_close(translator_loss(pred, target, text), expected)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(50):
        optimiser.zero_grad()
        loss = translator_loss(model(z), target, text)
        loss.backward()
        optimiser.step()
        first = loss.item() if first is None else first
    assert loss.item() < first
