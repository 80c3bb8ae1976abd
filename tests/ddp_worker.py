"""Training cases that tests run both in one process and under torchrun (DDP on CPU ranks, gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py <out.pt>

Each case trains on fixed global batches; a rank feeds its trainer its contiguous part of every
batch (`part`), and rank 0 saves {case: result} to <out.pt> (one launch for all cases: starting
ranks is the slow part). Called with Ranks() (one process), a case trains on the whole batches, so
the two results must agree.
"""

import sys

import torch

from lib.core.distributed import Ranks, init_ranks

STEPS, BATCH = 6, 8


def part(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous share of a global batch (the batch splits evenly)."""
    size = batch.shape[0] // ranks.world_size
    return batch[ranks.rank * size : (ranks.rank + 1) * size]


def cbl_case(ranks: Ranks) -> dict[str, torch.Tensor]:
    """SALF-CBM's bottleneck: the cubic cosine loss centres and normalises across the global batch."""
    from lib.methods.salf.cbl import train_bottleneck

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(STEPS + 1, BATCH, 6, 3, 3, generator=generator)
    targets = torch.einsum("sbchw,mc->sbmhw", features, torch.randn(4, 6, generator=generator))
    targets = targets + 0.5 * torch.randn(targets.shape, generator=generator)

    def train():  # noqa: ANN202
        return ((part(features[s], ranks), part(targets[s], ranks)) for s in range(STEPS))

    def val():  # noqa: ANN202
        return iter([(part(features[STEPS], ranks), part(targets[STEPS], ranks))])

    model, history = train_bottleneck(train, val, 6, 4, torch.zeros(3, 3, 2), lr=0.05, max_steps=STEPS, eval_every=2,
                                      patience=100, ranks=ranks)
    return {"weight": model.conv.weight.detach(), "val_loss": torch.tensor(history["val_loss"]),
            "train_loss": torch.tensor(history["train_loss"])}


def sae_case(ranks: Ranks) -> dict[str, torch.Tensor]:
    """FaCT's SAE: the loss normalises by sums over the global batch; dead latents (dead_after below
    the steps' vectors) revive through the aux-k loss, whose counts are global too."""
    from lib.methods.fact.sae import BiasFreeTopKSAE
    from lib.methods.fact.train import TrainConfig, TrainState, train

    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(12, 20, generator=generator), dim=0)
    codes = torch.rand(STEPS, BATCH * 4, 20, generator=generator) * (torch.rand(STEPS, BATCH * 4, 20, generator=generator) < 0.15)
    data = codes @ atoms.T
    model = BiasFreeTopKSAE(12, 32, 3, aux_k=4, dead_after=3 * BATCH * 4, generator=torch.Generator().manual_seed(1))
    model.fit_scale([data.flatten(0, 1)])
    state = TrainState.create(model, TrainConfig(steps=STEPS, lr=1e-2, warmup_steps=2), ranks)
    log = train(state, (part(data[s], ranks) for s in range(STEPS)))
    return {"encoder": model.encoder.weight.detach(), "decoder": model.decoder.weight.detach(),
            "dead": model.tokens_since_fired.clone(), "loss": torch.tensor(log.loss), "aux": torch.tensor(log.aux)}


def translator_case(ranks: Ranks) -> dict[str, torch.Tensor]:
    """CE-FAM's translator: the embedding and concept-score losses (means over the batch), plateau
    schedule and early stopping on the val loss summed over ranks."""
    from lib.methods.cefam.training import TrainSettings, train_translator
    from lib.methods.cefam.translator import Translator

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(STEPS, BATCH, 10, generator=generator)
    emb = torch.nn.functional.normalize(torch.tanh(z @ torch.randn(10, 6, generator=generator)), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 6, generator=generator), dim=-1)
    torch.manual_seed(1)
    model = Translator(10, 6, (8,))

    def train(epoch: int):  # noqa: ANN202
        return ((part(z[s], ranks), part(emb[s], ranks)) for s in range(STEPS - 1))

    def val(epoch: int):  # noqa: ANN202
        return iter([(part(z[-1], ranks), part(emb[-1], ranks))])

    settings = TrainSettings(lam=1e-3, lr=0.1, max_epochs=4, plateau_patience=1, patience=3)
    model, history = train_translator(model, train, val, text, settings, ranks=ranks)
    return {**{name: value.detach() for name, value in model.state_dict().items()},
            "val_loss": torch.tensor(history["val_loss"]), "train_loss": torch.tensor(history["train_loss"])}


CASES = {"cbl": cbl_case, "sae": sae_case, "translator": translator_case}

if __name__ == "__main__":
    ranks, _ = init_ranks(torch.device("cpu"))
    results = {name: case(ranks) for name, case in CASES.items()}
    if ranks.is_main:
        torch.save(results, sys.argv[1])
