"""Benchmark our SAE training against the library FaCT trains with: dictionary_learning's TopKTrainer.

    .venv/bin/python -m benchmarks.sae [--vectors 200000] [--channels 128] [--expansion 8] [--k 16]
                                       [--batch-size 4096] [--steps 100] [--threads 1]

Needs dictionary_learning 0.1.0 importable. Its dependencies (nnsight, transformers, wandb, datasets,
umap-learn, ...) serve its language-model buffers, not the trainer, so install it alone:

    .venv/bin/pip install --no-deps dictionary-learning==0.1.0     # einops, its trainer's one import, is ours already

Its package __init__ imports nnsight (for ActivationBuffer); this script imports only
`dictionary_learning.trainers.top_k`, without running that __init__.

Both train on the same synthetic training vectors (sparse non-negative combinations of 4 * C
directions, like post-ReLU features), from the same initial weights, on the same batches, with the
same k, latents, aux-k (FaCT: min(256, J / 2) dead latents, dead after half an epoch, aux coefficient
1/32), Adam, gradient clipping and learning-rate schedule (warm-up, then cosine, as FaCT replaces the
library's linear decay). dictionary_learning is set up as FaCT sets it up (m-parchami/FaCT
fact/training/saes.py): encoder bias and b_dec zeroed and frozen (FaCT deletes them), no b_dec from
the geometric median at step 0, no threshold, inputs divided by the norm factor sqrt(mean ||x||^2).

Timed: the training steps only, one run each, after one untimed warm-up step each. The final loss is
FaCT's (mean ||x / s - x_hat||^2 over all vectors) of each trained model, computed by one function.
Ends with `speed_vs_dictionary_learning=<their seconds / ours> loss_ratio=<our final loss / theirs>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types

import torch
from torch import Tensor

from lib.methods.fact.sae import BiasFreeTopKSAE
from lib.methods.fact.train import TrainConfig, TrainState, WarmupCosine, train_step

INSTALL = ".venv/bin/pip install --no-deps dictionary-learning==0.1.0"


def import_topk() -> types.ModuleType | None:
    """dictionary_learning.trainers.top_k without the package's __init__ (which needs nnsight); None if absent."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or spec.submodule_search_locations is None:
        return None
    if "dictionary_learning" not in sys.modules:
        package = types.ModuleType("dictionary_learning")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = package
    import dictionary_learning.trainers.top_k as top_k

    return top_k


def synthetic_vectors(n: int, channels: int, seed: int = 0) -> Tensor:
    """(n, channels) float32: ReLU of sparse non-negative combinations of 4 * channels random directions."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(4 * channels, channels, generator=g)
    rows = []
    for start in range(0, n, 16384):
        size = min(16384, n - start)
        codes = torch.empty(size, 4 * channels).exponential_(generator=g) * (torch.rand(size, 4 * channels, generator=g) < 0.02)
        rows.append((codes @ directions).clamp_min(0))
    return torch.cat(rows)


def batch_order(n: int, batch_size: int, steps: int, seed: int = 1) -> list[Tensor]:
    """The rows of each step's batch: epoch after epoch of a seeded permutation, last partial batch dropped."""
    g = torch.Generator().manual_seed(seed)
    order: list[Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(n, generator=g)
        order += [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return order[:steps]


@torch.no_grad()
def facts_loss(reconstruct, data: Tensor, scale: float) -> float:
    """FaCT's loss without the aux term: mean over vectors of ||x / s - x_hat(x / s)||^2."""
    total = 0.0
    for start in range(0, len(data), 16384):
        xs = data[start : start + 16384] / scale
        total += float((xs - reconstruct(xs)).double().square().sum())
    return total / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--expansion", type=int, default=8, help="latents per channel (FaCT: 8)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    top_k = import_topk()
    if top_k is None:
        sys.exit(f"dictionary_learning is not importable; install it with: {INSTALL}")
    torch.set_num_threads(args.threads)
    latents = args.expansion * args.channels
    aux_k, dead_after = min(256, latents // 2), args.vectors // 2
    warmup, decay = max(1, args.steps // 16), max(1, args.steps // 8)  # FaCT's 1 and 2 of 16 epochs
    data = synthetic_vectors(args.vectors, args.channels)
    batches = batch_order(args.vectors, args.batch_size, args.steps + 1)

    torch.manual_seed(0)
    theirs = top_k.TopKTrainer(steps=args.steps + 1, activation_dim=args.channels, dict_size=latents, k=args.k, layer=0, lm_name="-",
                               lr=args.lr, auxk_alpha=1 / 32, warmup_steps=warmup, decay_start=decay,
                               threshold_start_step=10**12, seed=0, device="cpu")
    ae = theirs.ae
    with torch.no_grad():  # FaCT: no biases (zeroed and frozen: Adam skips parameters without gradients)
        ae.encoder.bias.zero_()
        ae.b_dec.zero_()
    ae.encoder.bias.requires_grad_(False)
    ae.b_dec.requires_grad_(False)
    theirs.top_k_aux, theirs.dead_feature_threshold = aux_k, dead_after
    theirs.scheduler = torch.optim.lr_scheduler.LambdaLR(theirs.optimizer, WarmupCosine(args.steps + 1, warmup, decay))

    ours = BiasFreeTopKSAE(args.channels, latents, args.k, aux_k=aux_k, aux_coef=1 / 32, dead_after=dead_after)
    with torch.no_grad():  # the same initial weights
        ours.encoder.weight.copy_(ae.encoder.weight)
        ours.decoder.weight.copy_(ae.decoder.weight)
    scale = ours.fit_scale([data])
    state = TrainState.create(ours, TrainConfig(steps=args.steps + 1, lr=args.lr, warmup_steps=warmup, decay_start=decay))

    def run_theirs(step: int) -> None:
        theirs.update(step + 1, data[batches[step]] / scale)  # step + 1: no geometric-median b_dec at step 0 (FaCT)

    def run_ours(step: int) -> None:
        train_step(state, data[batches[step]])

    seconds = {}
    for name, run in (("dictionary_learning", run_theirs), ("ours", run_ours)):
        run(0)  # warm-up, untimed
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            run(step)
        seconds[name] = time.perf_counter() - start

    ours.eval()
    loss_ours = facts_loss(lambda xs: ours(xs), data, scale)  # homogeneous: ours(x / s) = x_hat / s
    loss_theirs = facts_loss(lambda xs: ae(xs), data, scale)
    per_step = {name: 1000 * value / args.steps for name, value in seconds.items()}
    print(f"N={args.vectors} C={args.channels} J={latents} k={args.k} aux_k={aux_k} batch={args.batch_size} steps={args.steps} "
          f"threads={args.threads}")
    print(f"dictionary_learning {per_step['dictionary_learning']:.1f} ms/step, final loss {loss_theirs:.5f}; "
          f"ours {per_step['ours']:.1f} ms/step, final loss {loss_ours:.5f}")
    print(f"speed_vs_dictionary_learning={seconds['dictionary_learning'] / seconds['ours']:.3f} loss_ratio={loss_ours / loss_theirs:.4f}")


if __name__ == "__main__":
    main()
