"""Bias-free TopK SAE (lib.methods.fact.sae): structure, codes, scaling, decoder constraints, dead
latents and the aux-k loss, each against a known answer or a brute-force recomputation."""

import math

import pytest
import torch

from lib.methods.fact.sae import BiasFreeTopKSAE

C, J, K = 12, 40, 5


def make(seed: int = 0, **kwargs) -> BiasFreeTopKSAE:
    return BiasFreeTopKSAE(C, J, K, generator=torch.Generator().manual_seed(seed), **kwargs)


def data(n: int = 64, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed)) * scale


def test_no_bias_unit_atoms_and_tied_init():
    model = make()
    assert sorted(name for name, _ in model.named_parameters()) == ["decoder.weight", "encoder.weight"]
    assert model.encoder.bias is None and model.decoder.bias is None
    assert model.atoms.shape == (C, J)
    torch.testing.assert_close(model.atoms.norm(dim=0), torch.ones(J))
    assert torch.equal(model.encoder.weight, model.decoder.weight.T)
    # Zero in, zero out: no bias anywhere.
    assert torch.equal(model(torch.zeros(3, C)), torch.zeros(3, C))


def test_codes_are_topk_of_relu_and_sparse_form_agrees():
    model = make()
    x = data()
    codes = model.encode_topk(x)
    pre = torch.relu(x @ model.encoder.weight.T)
    # Brute force: keep the K largest entries per row.
    kth = pre.sort(dim=1, descending=True).values[:, K - 1 : K]
    expected = torch.where(pre >= kth, pre, torch.zeros_like(pre))
    torch.testing.assert_close(codes.dense, expected)
    assert ((codes.dense > 0).sum(dim=1) <= K).all() and (codes.dense >= 0).all()
    assert codes.values.shape == codes.indices.shape == (x.shape[0], K)
    torch.testing.assert_close(codes.dense.gather(1, codes.indices), codes.values)
    torch.testing.assert_close(model.decode_sparse(codes.values, codes.indices), model.decode(codes.dense))
    torch.testing.assert_close(model(x), codes.dense @ model.atoms.T)


def test_fit_scale_is_root_mean_squared_norm_streaming():
    model = make()
    batches = [data(10, seed=s, scale=7.0) for s in range(3)]
    value = model.fit_scale(iter(batches))
    expected = torch.cat(batches).square().sum(dim=1).mean().sqrt().item()
    assert value == pytest.approx(expected, rel=1e-6)
    assert model.scale.item() == pytest.approx(expected, rel=1e-6)
    assert "scale" in model.state_dict()
    with pytest.raises(ValueError):
        model.fit_scale([torch.zeros(4, C)])


def test_scale_is_internal_encode_unscaled_and_homogeneous():
    model = make()
    x = data(scale=50.0)
    model.fit_scale([x])
    s = model.scale.item()
    # Codes are in input units: s * codes of the scaled input; and positively homogeneous.
    torch.testing.assert_close(model.encode(x), s * model.encode(x / s), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model.encode(3.0 * x), 3.0 * model.encode(x), rtol=1e-5, atol=1e-4)
    # decode(encode(x)) is a reconstruction of x itself, whatever the scale.
    assert (model(x) - x).norm() < x.norm()


def test_loss_scale_invariant_and_scale_keeps_large_inputs_finite():
    """Bias-free codes and normalised losses make loss and gradients invariant to rescaling the data;
    the scale buffer keeps the arithmetic in range: feature norms ~1e20 square past float32's max
    unless divided by the fitted scale first."""
    x = data()

    def loss_and_grad(model: BiasFreeTopKSAE, inputs: torch.Tensor) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        out = model.loss(inputs, track_dead=False)
        out.loss.backward()
        return out.loss.item(), model.encoder.weight.grad.clone()

    a, b = make(), make()
    a.fit_scale([x])
    b.fit_scale([1000.0 * x])
    (la, ga), (lb, gb) = loss_and_grad(a, x), loss_and_grad(b, 1000.0 * x)
    assert la == pytest.approx(lb, rel=1e-5)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)

    huge = 1e20 * x
    unscaled = make()
    assert not math.isfinite(unscaled.loss(huge, track_dead=False).loss.item())
    scaled = make()
    scaled.fit_scale([huge])
    assert scaled.loss(huge, track_dead=False).loss.item() == pytest.approx(la, rel=1e-4)


def test_remove_parallel_grad_and_renormalise():
    model = make()
    model.loss(data()).loss.backward()
    before = model.decoder.weight.grad.clone()
    model.remove_parallel_grad()
    after = model.decoder.weight.grad
    atoms = model.atoms.detach()
    tol = 1e-6 * float(before.abs().max())  # float32 round-off of a 12-term sum
    torch.testing.assert_close((after * atoms).sum(dim=0), torch.zeros(J), atol=tol, rtol=0)
    # Only the parallel part was removed.
    torch.testing.assert_close(after + (before * atoms).sum(dim=0) * atoms, before)
    with torch.no_grad():
        model.decoder.weight.mul_(torch.linspace(0.1, 5.0, J))
    model.renormalise_decoder()
    torch.testing.assert_close(model.atoms.norm(dim=0), torch.ones(J))


def test_loss_is_facts_mse_of_the_scaled_inputs_known_answer():
    """FaCT's loss: sum_n ||x_n / s - x_hat_n||^2 / N. Two latents along e0 and e1, k = 1, scale 2:
    x = (3, 4) keeps the 4 (x_hat = (0, 4)): ||e / s||^2 = (3 / 2)^2 = 2.25; x = (1, 0) is exact.
    Mean 1.125 (a normalised MSE would give 2.25 / (6.25 + 0.25) = 0.346)."""
    model = BiasFreeTopKSAE(2, 2, 1, aux_coef=0.0)
    with torch.no_grad():
        model.encoder.weight.copy_(torch.eye(2))
        model.decoder.weight.copy_(torch.eye(2))
        model.scale.fill_(2.0)
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    out = model.loss(x)
    assert out.mse.item() == pytest.approx(1.125, rel=1e-6)
    assert out.loss.item() == pytest.approx(1.125, rel=1e-6)


def dead_setup(dead_after: int = 100, **kwargs) -> tuple[BiasFreeTopKSAE, torch.Tensor, torch.Tensor]:
    """Non-negative data; latents 0..4 have all-negative encoder rows, so they can never fire."""
    model = make(dead_after=dead_after, **kwargs)
    never = torch.arange(5)
    with torch.no_grad():
        model.encoder.weight[never] = -model.encoder.weight[never].abs()
    return model, data(30).abs(), never


def test_dead_latent_bookkeeping():
    model, x, never = dead_setup()
    model.loss(x)
    model.loss(x)
    counts = model.tokens_since_fired
    assert (counts[never] == 60).all()
    fired = (model.encode(x) > 0).any(dim=0)
    assert (counts[fired] == 0).all() and (counts[~fired] == 60).all()
    assert not model.loss(x, track_dead=False).dead_fraction.item() > 0  # 60 < 100: none dead yet
    model.loss(x)
    model.loss(x)  # 120 >= 100
    assert model.loss(x, track_dead=False).dead_fraction.item() == pytest.approx((~fired).sum().item() / J)


def test_fired_means_chosen_by_the_top_k_even_at_zero():
    """FaCT (dictionary_learning): a latent the top-k picks counts as fired whatever its value. With
    k = 3 and only latent 0 positive on this input, latents 1 and 2 are picked at 0 (topk's tie order
    among the zeros) and are not counted dead; every other latent is."""
    model = BiasFreeTopKSAE(2, 6, 3, dead_after=1)
    with torch.no_grad():
        model.encoder.weight.copy_(torch.tensor([[1.0, 0.0]] + [[-1.0, 0.0]] * 5))
    x = torch.tensor([[1.0, 0.0]])
    chosen = model.pre_activations(x).topk(3, dim=-1, sorted=False).indices[0]
    assert (model.encode(x) > 0).sum() == 1 and 0 in chosen.tolist()
    model.loss(x)
    picked = torch.zeros(6, dtype=torch.bool)
    picked[chosen] = True
    assert (model.tokens_since_fired[picked] == 0).all() and (model.tokens_since_fired[~picked] == 1).all()


def test_aux_loss_matches_brute_force_and_is_capped_by_dead_count():
    model, x, _ = dead_setup(dead_after=1)
    with torch.no_grad():  # let some dead latents have positive pre-activations
        model.encoder.weight[:3] = model.encoder.weight[:3].abs()
        model.tokens_since_fired.zero_()
        model.tokens_since_fired[:8] = 5  # latents 0..7 dead (0..2 now responsive)
    dead = torch.zeros(J, dtype=torch.bool)
    dead[:8] = True
    out = model.loss(x, track_dead=False)

    # Brute force: per row, the min(256, 8) = 8 largest ReLU pre-activations among dead latents.
    xs = x / model.scale
    pre = torch.relu(xs @ model.encoder.weight.T).detach()
    z = torch.where(dead, pre, torch.zeros_like(pre))
    e = xs - model(xs).detach()
    recon = z @ model.atoms.detach().T
    expected = (e - recon).square().sum() / (e - e.mean(0)).square().sum()
    assert out.aux.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.mse.item() + out.aux.item() / 32, rel=1e-6)

    capped = make(dead_after=1, aux_k=8)
    capped.load_state_dict(model.state_dict())
    assert capped.loss(x, track_dead=False).aux.item() == pytest.approx(out.aux.item(), rel=1e-6)
    fewer = make(dead_after=1, aux_k=2)
    fewer.load_state_dict(model.state_dict())
    assert fewer.loss(x, track_dead=False).aux.item() != pytest.approx(out.aux.item(), rel=1e-3)


def test_aux_loss_zero_without_dead_and_grads_only_reach_dead_latents():
    model, x, _ = dead_setup(dead_after=10**9)
    assert model.loss(x).aux.item() == 0.0

    with_aux, x, never = dead_setup(dead_after=1)
    with torch.no_grad():
        with_aux.encoder.weight[never[:2]] = with_aux.encoder.weight[never[:2]].abs()
    without = make(dead_after=1, aux_coef=0.0)
    without.load_state_dict(with_aux.state_dict())
    with_aux.tokens_since_fired[never] = 10  # only these are dead
    without.tokens_since_fired[never] = 10
    with_aux.loss(x, track_dead=False).loss.backward()
    without.loss(x, track_dead=False).loss.backward()
    diff_enc = (with_aux.encoder.weight.grad - without.encoder.weight.grad).abs().sum(dim=1)
    diff_dec = (with_aux.decoder.weight.grad - without.decoder.weight.grad).abs().sum(dim=0)
    live = torch.ones(J, dtype=torch.bool)
    live[never] = False
    assert (diff_enc[live] == 0).all() and (diff_dec[live] == 0).all()
    assert (diff_enc[never[:2]] > 0).all() and (diff_dec[never[:2]] > 0).all()


def test_from_fact_state_dict_and_config_roundtrip():
    model = make()
    released = {
        "encoder.weight": model.encoder.weight.detach().clone(),
        "decoder.weight": model.decoder.weight.detach().clone(),
        "k": torch.tensor(K, dtype=torch.int),
        "threshold": torch.tensor(-1.0),
    }
    loaded = BiasFreeTopKSAE.from_fact_state_dict(released)
    assert loaded.k == K and loaded.scale.item() == 1.0
    x = data(scale=9.0)
    model.fit_scale([x])  # the scale must not matter at inference
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias"):
        BiasFreeTopKSAE.from_fact_state_dict({**released, "encoder.bias": torch.zeros(J)})
    rebuilt = BiasFreeTopKSAE(**model.config())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        BiasFreeTopKSAE(C, 4, 5)
    with pytest.raises(ValueError):
        BiasFreeTopKSAE(0, 4, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = make()
    x = data()
    cuda_model = make().cuda()
    torch.testing.assert_close(cuda_model(x.cuda()).cpu(), model(x), rtol=1e-4, atol=1e-5)
    out = cuda_model.loss(x.cuda())
    assert math.isfinite(out.loss.item())
