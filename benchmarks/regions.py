"""Benchmark CE-FAM's concept regions: our batched Grad-CAM weights against the reference style.

    .venv/bin/python -m benchmarks.regions [--images 8] [--concepts 100] [--device auto]

Every concept's region at every layer of a batch of images, two ways each, outputs checked equal:

* jacobian — ours: one backbone forward, then one Jacobian of the translator per image
  (torch.func, regions.concept_betas) gives beta for all concepts and layers; the reference
  style (the authors' utils/cefam.py) deep-copies the models for every (image, concept), runs the
  backbone and backpropagates S^t, here to the layers' maps as leaves (the translator branch,
  so both compute the same betas).
* total — the paper's Grad-CAM through the backbone: ours backpropagates min(M, D) cotangents in
  batched passes (regions.concept_betas_total); the reference backpropagates S^t through the
  deep-copied backbone once per (image, concept).

Default models: the toy CNN (random init; 64 px; layer1-3: 32 + 64 + 128 channels) and a
translator of default widths into a 128-d space, M random concept embeddings. The last line is
`total_speedup=<reference/ours> speedup=<reference/ours for the Jacobian method>`.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.circles import best_seconds
from lib.core.device import resolve_device
from lib.methods.cefam.regions import concept_betas, concept_betas_total, concept_regions, pool_features
from lib.methods.cefam.taps import tapped_forward
from lib.methods.cefam.translator import Translator
from lib.toy.models.cnn import build_toy

LAYERS = ("layer1", "layer2", "layer3")


def ours(model, translator, x, text, total: bool) -> list[torch.Tensor]:
    """Regions (B, M, h, w) per layer, the way the regions stage computes them."""
    with torch.enable_grad() if total else torch.no_grad():
        _, maps = tapped_forward(model, x.detach().requires_grad_(total), LAYERS)
        if total:
            betas = concept_betas_total(translator, maps, text, chunk_size=64)
        else:
            z, hw = pool_features(maps)
            betas = concept_betas(translator, z, text, hw)
    return concept_regions(betas, [a.detach() for a in maps])


def reference(model, translator, x, text, total: bool) -> list[torch.Tensor]:
    """The reference style: per (image, concept), deep copies of both models, a forward with
    hooks on the layers, one backward of S^t, gradients averaged over space, a weighted sum."""
    regions = [torch.zeros(x.shape[0], text.shape[0], *shape) for shape in _shapes(model, x)]
    for b in range(x.shape[0]):
        for t in range(text.shape[0]):
            net, head = copy.deepcopy(model), copy.deepcopy(translator)
            kept = {}
            modules = dict(net.named_modules())
            handles = [modules[n].register_forward_hook(lambda m, a, o, n=n, kept=kept: kept.__setitem__(n, o)) for n in LAYERS]
            with torch.enable_grad():
                net(x[b : b + 1].clone().requires_grad_(total))
                for handle in handles:
                    handle.remove()
                maps = [kept[n] if total else kept[n].detach().requires_grad_(True) for n in LAYERS]
                score = head.scores(torch.cat([a.mean(dim=(2, 3)) for a in maps], dim=1), text)[0, t]
                grads = torch.autograd.grad(score, maps)
            for layer, (a, g) in enumerate(zip(maps, grads, strict=True)):
                weights = g.mean(dim=(2, 3))  # (1, C)
                regions[layer][b, t] = torch.relu((weights[:, :, None, None] * a.detach()).sum(dim=1))[0]
    return regions


def _shapes(model, x) -> list[tuple[int, int]]:
    with torch.no_grad():
        return [tuple(a.shape[2:]) for a in tapped_forward(model, x[:1], LAYERS)[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--concepts", type=int, default=100)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds after a warm-up (the fastest counts)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_toy("cnn", 8).to(device).eval().requires_grad_(False)
    translator = Translator(32 + 64 + 128, args.embed_dim).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.images, 3, 64, 64, generator=g).to(device)
    text = torch.randn(args.concepts, args.embed_dim, generator=g).to(device)

    ratios = {}
    for name, total in (("total", True), ("jacobian", False)):
        for a, b in zip(ours(model, translator, x, text, total), reference(model, translator, x, text, total), strict=True):
            torch.testing.assert_close(a, b.to(a.device), rtol=1e-4, atol=1e-6)  # the same regions
        runs = {
            "ours": lambda total=total: ours(model, translator, x, text, total),
            "reference": lambda total=total: reference(model, translator, x, text, total),
        }
        seconds = best_seconds(runs, device, args.rounds)
        pairs = args.images * args.concepts
        print(
            f"{name}: {args.images} images x {args.concepts} concepts x {len(LAYERS)} layers on {device}: "
            f"ours {seconds['ours'] * 1e3:.1f} ms, reference {seconds['reference']:.2f} s "
            f"({seconds['reference'] / pairs * 1e3:.1f} ms per (image, concept)); same regions"
        )
        ratios[name] = seconds["reference"] / seconds["ours"]
    print(f"total_speedup={ratios['total']:.0f} speedup={ratios['jacobian']:.0f}")


if __name__ == "__main__":
    main()
