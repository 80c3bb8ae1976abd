"""Benchmark CE-FAM's Grad-CAM weights with the paper's total derivative: ours against a plain loop.

    .venv/bin/python -m benchmarks.regions [--images 8] [--concepts 100 4000] [--embed-dim 512] [--threads 2]

Both compute beta^t_k = mean_ij dS^t/dA^l_k(i, j) through the whole network (backbone and
translator) for every concept, layer and image, from one forward of the backbone:

* plain — one backward of S^t per concept (retain_graph), no copies of the models;
* ours — `regions.concept_betas_total`, the regions stage's default: backpropagates the fewest
  rows of the M scores, the D embedding coordinates or the C pooled channels, or goes forward
  with one JVP per channel of layer1-2 (96) when that is fewer (`total_basis`), and gives every
  concept's beta by one matmul; rows per backward (or tangents per JVP) sized for the device.

The betas of the timed runs are checked equal (to 1e-5 relative). `--plain-sample N` times the plain
loop on the first N concepts only and scales its backward part to M (the loop is one forward plus
M identical backwards: estimate = forward + (time - forward) * M / N), for machines too loaded to
run 4000 backwards; the line then says "estimated". Models: the toy CNN (random init,
64 px; layer1-3: 32 + 64 + 128 = 224 channels) and a translator of default widths into D
dimensions, M random concept embeddings. Prints the path each M took; the last line is
`speedup_m<M>=<plain/ours> ...`.
"""

from __future__ import annotations

import argparse
import time

import torch

from lib.core.device import resolve_device
from lib.methods.cefam.regions import concept_betas_total, default_tangent_chunk, default_total_chunk, total_basis
from lib.methods.cefam.taps import tapped_forward
from lib.methods.cefam.translator import Translator
from lib.toy.models.cnn import build_toy

LAYERS = ("layer1", "layer2", "layer3")


def _maps(model, x) -> list[torch.Tensor]:
    return tapped_forward(model, x.detach().clone().requires_grad_(True), LAYERS)[1]


def ours(model, translator, x, text) -> list[torch.Tensor]:
    """beta (B, M, C_l) per layer, the way the regions stage computes them."""
    with torch.enable_grad():
        return concept_betas_total(translator, _maps(model, x), text, backbone=(model, x, LAYERS))


def plain(model, translator, x, text) -> list[torch.Tensor]:
    """One forward, then one backward of S^t per concept to the layers' maps, averaged over space."""
    with torch.enable_grad():
        maps = _maps(model, x)
        scores = translator.scores(torch.cat([a.mean(dim=(2, 3)) for a in maps], dim=1), text)
        betas: list[list[torch.Tensor]] = [[] for _ in maps]
        for t in range(text.shape[0]):
            for per_layer, g in zip(betas, torch.autograd.grad(scores[:, t].sum(), maps, retain_graph=True), strict=True):
                per_layer.append(g.mean(dim=(2, 3)))
    return [torch.stack(b, dim=1) for b in betas]


def forward_only(model, x) -> list[torch.Tensor]:
    """The plain loop's forward: the part that does not grow with M."""
    with torch.enable_grad():
        return _maps(model, x)


def timed(runs: dict, device: torch.device, rounds: int) -> tuple[dict[str, float], dict]:
    """Fastest of `rounds` interleaved timings of each run, and each run's last result. Warm-up:
    the caller runs both code paths on 2 concepts first, since a full extra run costs hundreds of backwards."""
    best, results = dict.fromkeys(runs, float("inf")), {}
    for _ in range(rounds):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--concepts", type=int, nargs="+", default=[100, 4000])
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds after a warm-up (the fastest counts)")
    parser.add_argument("--plain-sample", type=int, default=None, help="time the plain loop on this many concepts, scaled to M")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_toy("cnn", 8).to(device).eval().requires_grad_(False)
    channels = 32 + 64 + 128
    translator = Translator(channels, args.embed_dim).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 3, 64, 64, generator=g).to(device)
    with torch.enable_grad():
        maps = _maps(model, x)
    # a vmap never holds more tangents than its layer has channels
    chunks = {"forward": min(default_tangent_chunk(maps), max(a.shape[1] for a in maps[:-1])), "backward": default_total_chunk(maps)}
    tangents = sum(a.shape[1] for a in maps[:-1])

    ratios = {}
    for m in args.concepts:
        text = torch.randn(m, args.embed_dim, generator=g).to(device)
        sample = m if args.plain_sample is None else min(args.plain_sample, m)
        runs = {
            "ours": lambda text=text: ours(model, translator, x, text),
            "plain": lambda sampled=text[:sample]: plain(model, translator, x, sampled),
            "forward": lambda: forward_only(model, x),
        }
        ours(model, translator, x, text[:2]), plain(model, translator, x, text[:2])  # warm-up
        seconds, results = timed(runs, device, args.rounds)
        for a, b in zip(results["ours"], results["plain"], strict=True):
            torch.testing.assert_close(a[:, :sample], b, rtol=1e-5, atol=1e-5 * b.abs().max().item())  # the same betas
        basis = total_basis(m, args.embed_dim, channels, tangents)
        rows = {"scores": m, "embedding": args.embed_dim, "pools": channels, "channels": tangents}[basis]
        path = (
            f"forward: {rows} JVPs, {chunks['forward']} per vmap" if basis == "channels"
            else f"{basis}: {rows} rows, {chunks['backward']} per backward"
        )
        plain_seconds = seconds["forward"] + (seconds["plain"] - seconds["forward"]) * m / sample
        how = f"{m} backwards" if sample == m else f"estimated from {sample} of {m} backwards"
        print(
            f"M={m}: {args.images} images x {len(LAYERS)} layers, D={args.embed_dim}, on {device} "
            f"({torch.get_num_threads()} threads): ours ({path}) {seconds['ours']:.2f} s, "
            f"plain ({how}) {plain_seconds:.2f} s; same betas"
        )
        ratios[m] = plain_seconds / seconds["ours"]
    print(" ".join(f"speedup_m{m}={ratio:.2f}" for m, ratio in ratios.items()))


if __name__ == "__main__":
    main()
