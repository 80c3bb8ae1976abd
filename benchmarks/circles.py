"""Benchmark the red-circle CLIP kernel against bare CLIP and a reference-style per-variant loop.

    .venv/bin/python -m benchmarks.circles [--images 8] [--device auto] [--autocast auto|true|false]

Prints embeddings/s for (a) CircleEncoder (uint8 images in, normalised circled embeddings out),
(b) bare `encode_image` on already-made batches of the size (a) forwards, (c) the reference style: per variant a Pillow
ring on the uint8 image, preprocess, one single-image forward. Same model, images and autocast
for all three: by default the precision the circles stage picks on this machine (circles.autocast:
auto, lib/core/device.py). The last line is `vs_bare=<a/b> vs_reference=<a/c>`.
Default model: a random-init open_clip ViT (width 192, 4 layers, 64 px, patch 8) standing in
for the toy CLIP; random weights cost the same FLOPs as trained ones.
"""

import argparse
import time
from collections.abc import Callable

import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageDraw

from lib.core.device import precision_name, resolve_device
from lib.kernels.preprocess import Preprocess
from lib.kernels.rings import CircleEncoder, grid_centers
from lib.models.clip import load_clip
from lib.toy.models.clip import register_toy_clip_config


def best_seconds(
    runs: dict[str, Callable[[], object]], device: torch.device, rounds: int
) -> dict[str, float]:
    """Fastest time of each run over `rounds` interleaved rounds, after one warm-up each.

    Interleaving spreads load from other processes evenly over the runs, and the minimum is
    the least-disturbed measurement on a shared machine.
    """
    best = {}
    for name, fn in runs.items():
        fn()
        best[name] = float("inf")
    for _ in range(rounds):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """torch.autocast at `dtype` on `device` (None: off, fp32)."""
    return torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None)


@torch.inference_mode()
def reference_loop(
    model: torch.nn.Module, preprocess: Preprocess, images: torch.Tensor, grid: int, radius: float, width: float,
    device: torch.device, dtype: torch.dtype | None,
) -> None:
    """What reference implementations do, one variant at a time: an aliased Pillow ring on the uint8
    image (H, W, 3) of `images`, preprocess, one single-image forward."""
    centers = grid_centers(preprocess.size, grid).int().tolist()
    for raw in images.numpy():
        for cy, cx in centers:
            drawn = Image.fromarray(raw)
            ImageDraw.Draw(drawn).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=(255, 0, 0), width=round(width))
            x = preprocess(torch.from_numpy(np.asarray(drawn).copy())[None].to(device))
            with autocast_context(device, dtype):
                torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per call of (a)")
    parser.add_argument("--size", type=int, default=64, help="CLIP input resolution")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--radius", type=float, default=9.0)
    parser.add_argument("--width", type=float, default=2.0)
    parser.add_argument("--clip-model", default=None, help="an open_clip model name (e.g. toy-clip); default: a random ViT")
    parser.add_argument("--clip-pretrained", default=None, help="its weights, as clip.pretrained (e.g. local-dir:models/toy/clip)")
    parser.add_argument("--vit-width", type=int, default=192)
    parser.add_argument("--vit-layers", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=512, help="max images per CLIP forward")
    parser.add_argument("--reference-images", type=int, default=1, help="images run through (c)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the fastest counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--autocast", choices=("auto", "true", "false"), default="auto",
                        help="as circles.autocast: auto = bf16/fp16 where the hardware runs it natively, else fp32")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    autocast = {"auto": "auto", "true": True, "false": False}[args.autocast]
    torch.manual_seed(0)
    if args.clip_model is not None:
        register_toy_clip_config()
        clip = load_clip(args.clip_model, args.clip_pretrained)
        model, preprocess = clip.model.eval().to(device), clip.preprocess
        args.size = preprocess.size
    else:
        model = open_clip.CLIP(
            embed_dim=128,
            vision_cfg=dict(image_size=args.size, patch_size=8, width=args.vit_width, layers=args.vit_layers,
                            head_width=64),
            text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=1),
        ).eval().to(device)
        preprocess = Preprocess(args.size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    encoder = CircleEncoder(model, preprocess, args.grid, args.radius, args.width, chunk=args.chunk,
                            autocast=autocast)
    images = torch.randint(0, 256, (args.images, args.size, args.size, 3), dtype=torch.uint8)
    variants = args.grid**2
    dtype = encoder.dtype  # the precision CircleEncoder chose; (b) and (c) run at the same

    # (b): the forwards (a) makes, on batches that already exist on the device.
    per_forward = encoder.images_per_forward * variants
    total = args.images * variants
    batch = torch.randn(min(per_forward, total), 3, args.size, args.size, device=device)
    forwards = -(-total // batch.shape[0])

    @torch.inference_mode()
    def bare() -> None:
        with autocast_context(device, dtype):
            for _ in range(forwards):
                model.encode_image(batch)

    def reference() -> None:  # (c)
        reference_loop(model, preprocess, images[: args.reference_images], args.grid, args.radius, args.width, device, dtype)

    seconds = best_seconds({"a": lambda: encoder(images), "b": bare, "c": reference}, device, args.rounds)
    rate_a = args.images * variants / seconds["a"]
    rate_b = total / seconds["b"]
    rate_c = args.reference_images * variants / seconds["c"]

    name = args.clip_model or f"random vit {args.vit_width}x{args.vit_layers}"
    print(f"device={device} threads={torch.get_num_threads()} autocast={args.autocast} ({precision_name(dtype)}) size={args.size} "
          f"grid={args.grid} model={name} images={args.images}")
    print(f"(a) circled embeddings/s        {rate_a:10.1f}")
    print(f"(b) bare encode_image images/s  {rate_b:10.1f}  (batches of {batch.shape[0]})")
    print(f"(c) reference loop images/s     {rate_c:10.1f}")
    print(f"vs_bare={rate_a / rate_b:.3f} vs_reference={rate_a / rate_c:.3f}")


if __name__ == "__main__":
    main()
