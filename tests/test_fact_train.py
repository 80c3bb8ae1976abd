"""SAE training loop (lib.methods.fact.train): schedule, bit-exact resume from a checkpoint, atomic
writes, streaming fraction of variance explained, and that training actually learns."""

import itertools
import math
from pathlib import Path

import pytest
import torch

from lib.core.distributed import Ranks
from lib.methods.fact import train as train_module
from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.methods.fact.train import (
    EpochPlan,
    Selection,
    TrainConfig,
    TrainState,
    WarmupCosine,
    fraction_of_variance_explained,
    train,
)

C, J, K = 16, 48, 3
TRUE_ATOMS = torch.nn.functional.normalize(torch.randn(C, 24, generator=torch.Generator().manual_seed(123)), dim=0)
POOL = 2048


def sparse_data(n: int, seed: int) -> torch.Tensor:
    """Vectors that are sums of K of 24 ground-truth atoms with positive coefficients."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, TRUE_ATOMS.shape[1], generator=g).topk(K, dim=1).indices
    z = torch.zeros(n, TRUE_ATOMS.shape[1]).scatter(1, idx, 0.5 + 2 * torch.rand(n, K, generator=g))
    return 5.0 * z @ TRUE_ATOMS.T


DATA = sparse_data(POOL, seed=0)


def batch_fn(step: int, rng: torch.Generator) -> torch.Tensor:
    """Depends on the step only through the checkpointed rng: resuming needs its state."""
    return DATA[torch.randint(0, POOL, (128,), generator=rng)]


def fresh(steps: int = 30, dead_after: int = 300, lr: float = 2e-3) -> TrainState:
    model = BiasFreeTopKSAE(C, J, K, aux_k=8, dead_after=dead_after, generator=torch.Generator().manual_seed(7))
    model.fit_scale([DATA[:512]])
    config = TrainConfig(steps=steps, lr=lr, warmup_steps=min(5, steps), decay_start=min(10, steps), seed=3)
    return TrainState.create(model, config)


def test_warmup_cosine_known_values():
    f = WarmupCosine(total_steps=110, warmup_steps=4, decay_start=10, min_factor=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == f(9) == 1.0
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError):
        WarmupCosine(10, warmup_steps=5, decay_start=3)


def test_epoch_plan_in_steps_and_facts_schedule_at_epoch_boundaries():
    """FaCT: 16 epochs, warm-up 1, constant to 2, cosine to 0 at 16, dead after half an epoch. With
    10 000 vectors in batches of 1000 an epoch is 10 steps."""
    plan = EpochPlan(n_vectors=10_000, batch_size=1000, epochs=16)
    assert (plan.total_steps, plan.warmup_steps, plan.decay_start, plan.dead_after) == (160, 10, 20, 5000)
    assert plan.epoch_ends == tuple(range(10, 161, 10))
    f = WarmupCosine(plan.total_steps, plan.warmup_steps, plan.decay_start)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0  # epoch 1: linear warm-up, full at its last step
    assert f(10) == f(19) == 1.0  # epoch 2: constant
    assert f(20) == 1.0 and f(90) == pytest.approx(0.5) and f(160) == pytest.approx(0.0)  # cosine from epoch 2 to 16
    assert f(80) == pytest.approx(0.5 * (1 + math.cos(math.pi * 60 / 140)))

    # fractional epochs: boundaries round to the nearest step; the last evaluation is at the last step
    odd = EpochPlan(n_vectors=1000, batch_size=300, epochs=2.5, warmup_epochs=0.25, decay_epochs=0.5, dead_epochs=0.5)
    assert (odd.total_steps, odd.warmup_steps, odd.decay_start, odd.dead_after) == (8, 1, 2, 500)
    assert odd.epoch_ends == (3, 7, 8)
    with pytest.raises(ValueError):
        EpochPlan(1000, 100, epochs=4, warmup_epochs=3, decay_epochs=2)


def test_selection_keeps_best_accuracy_then_lowest_loss():
    """A synthetic sequence of epoch-end evaluations: accuracy decides; at equal accuracy the lower
    val loss; an exact tie keeps the earlier step. The kept state is a copy, not a live view."""
    model = torch.nn.Linear(2, 1, bias=False)
    chosen = Selection()
    sequence = [(10, 0.90, 0.50), (20, 1.00, 0.40), (30, 1.00, 0.30), (40, 0.95, 0.10), (50, 1.00, 0.35), (60, 1.00, 0.30)]
    kept = []
    for step, accuracy, loss in sequence:
        with torch.no_grad():
            model.weight.fill_(step)
        kept.append(chosen.offer(step, accuracy, loss, model))
    assert kept == [True, True, True, False, False, False]
    assert (chosen.step, chosen.accuracy, chosen.loss) == (30, 1.0, 0.3)
    assert chosen.state["weight"].eq(30).all()


def test_scheduler_follows_schedule_in_training():
    state = fresh(steps=20)
    log = train(state, batch_fn)
    schedule = WarmupCosine(20, 5, 10)
    assert log.lr == pytest.approx([2e-3 * schedule(s) for s in range(20)])
    assert log.step == list(range(20)) and state.step == 20


def test_resume_from_checkpoint_is_bit_exact(tmp_path: Path):
    n_total, n_first = 30, 12
    straight = fresh(n_total)
    log_straight = train(straight, batch_fn)
    assert max(log_straight.dead_fraction) > 0 and max(log_straight.aux) > 0  # aux path exercised

    first = fresh(n_total)
    log_first = train(first, batch_fn, until=n_first, checkpoint_path=tmp_path / "ckpt.pt")
    del first
    resumed = fresh(n_total)  # fresh objects, different from the killed run's
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.step == n_first
    log_rest = train(resumed, batch_fn)

    assert log_first.loss + log_rest.loss == log_straight.loss
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    assert torch.equal(resumed.rng.get_state(), straight.rng.get_state())

    # The kept selection travels with the checkpoint.
    state = fresh(n_total)
    state.best.offer(3, 0.5, 0.2, state.model)
    state.save_checkpoint(tmp_path / "kept.pt")
    back = TrainState.from_checkpoint(tmp_path / "kept.pt")
    assert (back.best.step, back.best.accuracy, back.best.loss) == (3, 0.5, 0.2)
    assert all(torch.equal(value, back.best.state[name]) for name, value in state.best.state.items())

    # The checkpoint alone (configs inside) rebuilds the state, and finishing it gives the same model.
    rebuilt = TrainState.from_checkpoint(tmp_path / "ckpt.pt")
    assert rebuilt.step == n_first
    train(rebuilt, batch_fn)
    assert torch.equal(rebuilt.model.atoms, straight.model.atoms)


def test_periodic_checkpoints_and_iterable_batches(tmp_path: Path):
    state = fresh(10)
    path = tmp_path / "sub" / "ckpt.pt"
    saved_steps = []
    original = TrainState.save_checkpoint

    def spy(self: TrainState, p) -> None:
        saved_steps.append(self.step)
        original(self, p)

    TrainState.save_checkpoint = spy
    try:
        train(state, (DATA[i * 64 : (i + 1) * 64] for i in range(10)), checkpoint_path=path, checkpoint_every=4)
    finally:
        TrainState.save_checkpoint = original
    assert saved_steps == [4, 8, 10] and path.exists()
    with pytest.raises(ValueError, match="ran out"):
        train(fresh(10), iter([DATA[:8]]))
    with pytest.raises(ValueError):
        train(fresh(10), batch_fn, until=11)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    state = fresh(5)
    path = tmp_path / "ckpt.pt"
    state.save_checkpoint(path)
    before = path.read_bytes()
    train(state, batch_fn, until=2)

    def broken_save(obj, handle) -> None:
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(train_module.torch, "save", broken_save)
    with pytest.raises(OSError):
        state.save_checkpoint(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_load_rejects_other_model_config(tmp_path: Path):
    state = fresh(5)
    state.save_checkpoint(tmp_path / "c.pt")
    other = TrainState.create(BiasFreeTopKSAE(C, J + 1, K), TrainConfig(steps=5))
    with pytest.raises(ValueError, match="config"):
        other.load_checkpoint(tmp_path / "c.pt")


def test_fraction_of_variance_explained_streaming_and_known_answers():
    model = BiasFreeTopKSAE(C, J, K, generator=torch.Generator().manual_seed(1))
    x = DATA[:300] + 3.0  # non-zero mean, so centring matters
    fve = fraction_of_variance_explained(model, [x[:100], x[100:250], x[250:]])
    with torch.no_grad():
        expected = 1 - (x - model(x)).square().sum() / (x - x.mean(0)).square().sum()
    assert fve == pytest.approx(expected.item(), rel=1e-5)

    identity = BiasFreeTopKSAE(C, C, C)
    with torch.no_grad():
        identity.encoder.weight.copy_(torch.eye(C))
        identity.decoder.weight.copy_(torch.eye(C))
    assert fraction_of_variance_explained(identity, [x.abs()]) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        identity.decoder.weight.zero_()
    # Predicting 0 for data with mean m: 1 - sum||x||^2 / sum||x - m||^2.
    xa = x.abs()
    zero = 1 - xa.square().sum() / (xa - xa.mean(0)).square().sum()
    assert fraction_of_variance_explained(identity, [xa]) == pytest.approx(zero.item(), rel=1e-5)


def test_training_learns_sparse_structure():
    state = fresh(steps=300, dead_after=128 * 20, lr=1e-2)
    before = fraction_of_variance_explained(state.model, [sparse_data(1024, seed=99)])
    log = train(state, batch_fn)
    after = fraction_of_variance_explained(state.model, [sparse_data(1024, seed=99)])
    assert after > 0.85 and after > before + 0.3
    assert sum(log.mse[-10:]) < 0.5 * sum(log.mse[:10])
    assert all(math.isfinite(v) for v in log.loss)
    torch.testing.assert_close(state.model.atoms.norm(dim=0), torch.ones(J))
    rows = log.rows()
    assert len(rows) == 300 and set(rows[0]) == {"step", "loss", "mse", "aux", "dead_fraction", "lr"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_and_resume_on_cuda(tmp_path: Path):
    """On CUDA, embedding_bag's backward uses atomics, so a resumed run is only close to a straight one."""

    def cuda_batches(step: int, rng: torch.Generator) -> torch.Tensor:
        return batch_fn(step, rng).cuda()

    def cuda_state(steps: int) -> TrainState:
        state = fresh(steps, dead_after=128 * 20, lr=1e-2)
        return TrainState.create(state.model.cuda(), state.config)

    held_out = [sparse_data(1024, seed=99).cuda()]
    straight = cuda_state(150)
    log = train(straight, cuda_batches)
    assert all(math.isfinite(v) for v in log.loss)
    part = cuda_state(150)
    train(part, cuda_batches, until=60, checkpoint_path=tmp_path / "c.pt")
    resumed = TrainState.from_checkpoint(tmp_path / "c.pt", device="cuda")
    assert resumed.model.atoms.is_cuda and resumed.step == 60
    train(resumed, cuda_batches)
    fve_straight = fraction_of_variance_explained(straight.model, held_out)
    fve_resumed = fraction_of_variance_explained(resumed.model, held_out)
    assert fve_straight > 0.7 and fve_resumed == pytest.approx(fve_straight, abs=0.05)


def test_ddp_on_two_ranks_equals_one_process_on_the_global_batch(ddp_results):
    from tests.ddp_worker import sae_case

    ddp, one = ddp_results["sae"], sae_case(Ranks())
    assert one["loss"][-1] < one["loss"][0] and one["aux"].max() > 0  # it learns, and the aux-k loss took part
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5)
