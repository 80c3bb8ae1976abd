"""Concept presence and contributions (lib.methods.fact.contributions): completeness on a linear tail
and on B-cos tails, per-concept known answers, batching without cross-talk, explanation mode."""

import itertools

import pytest
import torch
from torch import nn

from lib.methods.fact.contributions import concept_contributions, detached_dynamic_weights, splice
from lib.methods.fact.sae import BiasFreeTopKSAE

C, J, K_SPARSE, CLASSES = 6, 20, 3, 5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def sae() -> BiasFreeTopKSAE:
    return BiasFreeTopKSAE(C, J, K_SPARSE, generator=gen(0)).eval()


@pytest.fixture
def feats() -> torch.Tensor:
    return torch.randn(4, C, 3, 4, generator=gen(1)).abs() + 0.1


def linear_head() -> nn.Module:
    """1x1 conv + average pool + linear: exactly linear in its input, plus a logit bias."""
    torch.manual_seed(2)
    head = nn.Sequential(nn.Conv2d(C, 8, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))
    with torch.no_grad():
        head[3].bias.copy_(torch.linspace(-3, 3, CLASSES))
    return head.eval()


def head_without_bias(head: nn.Module) -> nn.Module:
    plain = nn.Sequential(*head)
    plain[3] = nn.Linear(8, CLASSES, bias=False)
    plain[3].weight = head[3].weight
    return plain


def test_completeness_on_linear_tail(sae, feats):
    head = linear_head()
    out = concept_contributions(head, sae, feats)
    _, x_hat = splice(sae, feats)
    logits = head(x_hat)
    torch.testing.assert_close(out.logits, logits.detach())
    assert torch.equal(out.target, logits.argmax(dim=1))
    y = logits.detach().gather(1, out.target[:, None]).squeeze(1)
    bias = head[3].bias.detach()[out.target]
    torch.testing.assert_close(out.contributions.sum(dim=1), y - bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.contributions.sum(dim=1), out.explained, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.target_logit, y)


def test_per_concept_contribution_is_the_logit_of_its_own_reconstruction(sae, feats):
    """On a linear tail, C_j = (head without bias)(the map made of concept j alone: z_pj d_j)."""
    head = linear_head()
    target = torch.tensor([0, 1, 2, 3])
    out = concept_contributions(head, sae, feats, target=target)
    z, _ = splice(sae, feats)  # (B, HW, J)
    b, _, h, w = feats.shape
    plain = head_without_bias(head)
    # Brute force, one concept at a time (test only).
    expected = torch.zeros(b, J)
    for j in range(J):
        only_j = (z[:, :, j : j + 1] * sae.atoms[:, j]).reshape(b, h, w, C).permute(0, 3, 1, 2)
        expected[:, j] = plain(only_j).detach().gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(out.contributions, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.presence, z.sum(dim=1))
    assert (out.presence > 0).sum(dim=1).le(K_SPARSE * h * w).all()


def test_batched_equals_one_image_at_a_time_and_error(sae, feats):
    head = linear_head()
    batch = concept_contributions(head, sae, feats)
    for i in range(feats.shape[0]):
        single = concept_contributions(head, sae, feats[i : i + 1])
        torch.testing.assert_close(single.contributions[0], batch.contributions[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single.presence[0], batch.presence[i])
    _, x_hat = splice(sae, feats)
    torch.testing.assert_close(batch.error, (feats - x_hat).norm(dim=1))


def test_head_must_return_logits(sae, feats):
    with pytest.raises(ValueError, match="logits"):
        concept_contributions(nn.Identity(), sae, feats)


# ---------------------------------------------------------------------------------------------
# B-cos tails
bcos_modules = pytest.importorskip("bcos.modules")


def bcos_head(layers: int) -> nn.Module:
    torch.manual_seed(3)
    widths = [C, 9][:layers] + [CLASSES]
    convs = [bcos_modules.BcosConv2d(a, b, kernel_size=1) for a, b in itertools.pairwise(widths)]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def test_bcos_completeness_in_explanation_mode(sae, feats):
    head = bcos_head(layers=2)
    out = concept_contributions(head, sae, feats)
    torch.testing.assert_close(out.contributions.sum(dim=1), out.target_logit, rtol=1e-4, atol=1e-5)
    # Explanation mode was entered for the call only.
    assert all(not m.detach for m in head.modules() if hasattr(m, "set_explanation_mode"))


def test_bcos_contributions_use_the_dynamic_linear_map(sae, feats):
    """One B-cos layer (b=2) + mean pool: y_c = mean_p s_pc (w_c . x_p), s_pc = |w_c . x_p| / ||x_p||
    (bcos adds 1e-6 under the root). In explanation mode s is a constant, so
    C_j = sum_p z_pj s_pc (w_c . d_j) / HW. Without it the totals still match (b=2 is homogeneous)
    but the split among concepts does not."""
    head = bcos_head(layers=1)
    target = torch.tensor([4, 0, 2, 1])
    out = concept_contributions(head, sae, feats, target=target)
    z, x_hat = splice(sae, feats)
    b, _, h, w = feats.shape
    weight = head[0].linear.weight.detach().flatten(1)
    weight = weight / weight.norm(dim=1, keepdim=True)  # (classes, C) unit rows
    x = x_hat.permute(0, 2, 3, 1).reshape(b, h * w, C)
    w_c = weight[target]  # (B, C)
    dots = torch.einsum("bpc,bc->bp", x, w_c)
    s = dots.abs() / (x.square().sum(dim=2) + 1e-6).sqrt()
    atom_dots = torch.einsum("bc,cj->bj", w_c, sae.atoms.detach())  # (B, J)
    expected = torch.einsum("bpj,bp->bj", z, s) * atom_dots / (h * w)
    torch.testing.assert_close(out.contributions, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.contributions.sum(1), out.target_logit, rtol=1e-4, atol=1e-6)

    gradient_mode = concept_contributions(head, sae, feats, target=target, explanation_mode=False)
    torch.testing.assert_close(gradient_mode.contributions.sum(1), out.target_logit, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(gradient_mode.contributions, out.contributions, rtol=1e-2, atol=1e-4)


def test_explanation_mode_helper_and_bcos_mixin_agree(sae, feats):
    common = pytest.importorskip("bcos.modules.common")
    layers = list(bcos_head(layers=2))
    model = common.BcosSequential(*layers).eval()
    with model.explanation_mode():  # bcos's own context manager (BcosUtilMixin)
        theirs = concept_contributions(model, sae, feats, explanation_mode=False)
    ours = concept_contributions(model, sae, feats)
    torch.testing.assert_close(ours.contributions, theirs.contributions)
    with detached_dynamic_weights(model):
        assert all(m.detach for m in model.modules() if hasattr(m, "set_explanation_mode"))
        with detached_dynamic_weights(model):
            pass
        assert all(m.detach for m in model.modules() if hasattr(m, "set_explanation_mode"))  # restored, not reset
    assert not any(m.detach for m in model.modules() if hasattr(m, "set_explanation_mode"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(sae, feats):
    head = linear_head().cuda()
    out = concept_contributions(head, sae.cuda(), feats.cuda())
    cpu = concept_contributions(linear_head(), sae.cpu(), feats)
    torch.testing.assert_close(out.contributions.cpu(), cpu.contributions, rtol=1e-3, atol=1e-5)
