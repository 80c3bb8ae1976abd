"""Peak memory of one cbl training step at the profile's batch and concept count, against the stage's estimate.

    .venv/bin/python -m benchmarks.cbl_memory [--profile profiles/imagenet.yaml] [--concepts 4751]

One step of what the cbl stage runs per batch (ConceptBottleneck.project, cubic_cosine_loss,
backward, Adam) on sampled features (B, C, G, G) and P (B, M, G, G), its peak tensor memory
measured by torch's MemTracker: at the profile's full shapes on fake tensors (shapes and
allocations without the memory, so any machine can size an 80 GB GPU), and at 1/64 of the batch on
real tensors of this device, where the two must agree; with CUDA also torch.cuda.max_memory_allocated
of a real step at the full shapes. Compared with lib.methods.salf.cbl.step_bytes, the figure the
stage checks the device's free memory against before any work.
Last line: `cbl_peak_gib=… estimate_gib=… estimate_vs_measured=… real_vs_fake=… cuda_peak_gib=…`.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from lib.core.profile import profile_params
from lib.methods.salf.cbl import cubic_cosine_loss, step_bytes
from lib.methods.salf.model import ConceptBottleneck

LF_CBM_IMAGENET_CONCEPTS = 4751  # lines of LF-CBM's data/concept_sets/imagenet_filtered.txt


def one_step(batch: int, n_concepts: int, channels: int, grid: int, device: torch.device) -> None:
    """One training step of the bottleneck on random inputs created inside (they count)."""
    model = ConceptBottleneck(channels, n_concepts, None)
    if device.type != "cpu":  # (moving to the CPU it is on already fails under FakeTensorMode)
        model.to(device)
    optimiser = torch.optim.Adam(model.parameters())
    sampled = torch.randn(batch, channels, grid, grid, device=device)
    target = torch.randn(batch, n_concepts, grid, grid, device=device)
    loss = cubic_cosine_loss(model.project(sampled), target)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def tracked_peak(batch: int, n_concepts: int, channels: int, grid: int, fake: bool) -> int:
    """Peak bytes of all tensors of one_step on the CPU, by MemTracker (fake tensors: no memory used)."""
    with FakeTensorMode() if fake else contextlib.nullcontext():
        tracker = MemTracker()
        with tracker:
            one_step(batch, n_concepts, channels, grid, torch.device("cpu"))
        snapshot = tracker.get_tracker_snapshot("peak")
    return sum(value for per_device in snapshot.values() for key, value in per_device.items() if str(key) == "Total")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="profiles/imagenet.yaml", help="cbl.batch_size and circles.grid from it")
    parser.add_argument("--concepts", type=int, default=LF_CBM_IMAGENET_CONCEPTS, help="M (before the cos^3 filter)")
    parser.add_argument("--channels", type=int, default=2048, help="C of the bottleneck's layer (ResNet-50 layer4)")
    args = parser.parse_args(argv)
    config = profile_params(args.profile)
    batch, grid, m, c = config.cbl.batch_size, config.circles.grid, args.concepts, args.channels
    fake = tracked_peak(batch, m, c, grid, fake=True)
    small = max(2, batch // 64)
    real_vs_fake = tracked_peak(small, m, c, grid, fake=False) / tracked_peak(small, m, c, grid, fake=True)
    estimate = step_bytes(batch, m, c, grid)
    cuda_peak = float("nan")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.cuda.reset_peak_memory_stats(device)
        one_step(batch, m, c, grid, device)
        cuda_peak = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"cbl step at B={batch} M={m} C={c} G={grid}: peak {fake / 2**30:.2f} GiB (MemTracker, fake tensors), "
          f"estimate {estimate / 2**30:.2f} GiB; real/fake at B={small}: {real_vs_fake:.4f}; CUDA peak {cuda_peak:.2f} GiB")
    values = {"cbl_peak_gib": fake / 2**30, "estimate_gib": estimate / 2**30, "estimate_vs_measured": estimate / fake,
              "real_vs_fake": real_vs_fake, "cuda_peak_gib": cuda_peak}
    print(" ".join(f"{key}={value:.4g}" for key, value in values.items()))
    return values


if __name__ == "__main__":
    main()
