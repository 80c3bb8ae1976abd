"""Peak RAM of the sae stage at N and factor*N training vectors: it must not grow with N.

    .venv/bin/python -m benchmarks.sae_memory [--vectors 262144] [--factor 4] [--channels 256] [--threads 1]

For each size, in a temporary project folder: write a synthetic sae_data store of that many fp16
vectors (shard by shard, so this process stays small too), a small features store and manifest for
the val fve, and a params.yaml; then run `python -m stages sae` as a child process and read its peak
resident set size (benchmarks/rss.py). The SAE's size and steps do not depend on N, and `--steps`
defaults to one epoch of the small run; fit_scale reads every vector of both runs. The store's size
as float32 (what loading it whole would cost) is printed as `store_f32`.
Ends with `rss_ratio_4x=<peak at factor*N / peak at N>`.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.rss import run_child
from lib.core.layout import Layout
from lib.core.stores import ArraySpec, ShardedWriter
from lib.data.manifest import write_manifest
from lib.methods.fact.streams import IMAGE, POSITION, VECTORS

REPO = Path(__file__).resolve().parents[1]
VAL_IMAGES, GRID = 64, 4  # the features store for the val fve: fixed, whatever N


def write_vectors(path: Path, n: int, channels: int, rows_per_shard: int) -> None:
    """A synthetic sae_data store: sparse nonnegative combinations of 4 * channels directions, like
    post-ReLU features; each shard from its own seed."""
    specs = [ArraySpec(VECTORS, (n, channels), "float16", ("vector", "channel")),
             ArraySpec(IMAGE, (n,), "int64", ("vector",)), ArraySpec(POSITION, (n,), "int32", ("vector",))]
    writer = ShardedWriter(path, specs, rows_per_shard, {"model_id": "bench", "layer": "layer3"}, fingerprint=f"bench-{n}")
    directions = np.random.default_rng(0).standard_normal((4 * channels, channels)).astype(np.float32)
    for shard in writer.pending():
        rows = writer.rows(shard)
        rng = np.random.default_rng(shard + 1)
        size = rows.stop - rows.start
        codes = rng.exponential(size=(size, 4 * channels)).astype(np.float32) * (rng.random((size, 4 * channels)) < 0.02)
        writer.write(shard, {VECTORS: np.maximum(codes @ directions, 0), IMAGE: np.arange(rows.start, rows.stop) // 64,
                             POSITION: np.arange(rows.start, rows.stop) % 64})
    writer.finalize()


def measure(n: int, channels: int, sae: dict, env: dict[str, str]) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of the sae stage over `n` synthetic training vectors."""
    with tempfile.TemporaryDirectory(prefix="sae_memory_") as folder:
        project = Path(folder)
        params = {"runtime": {"device": "cpu"}, "data": {"name": "bench"}, "features": {"layers": ["layer3"]},
                  "fact": {"batch_size": 64, "sae": sae}}
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        layout = Layout(project / "data" / "bench", project / "metrics")
        layout.root.mkdir(parents=True)
        images = 2 * VAL_IMAGES
        split = ["train"] * VAL_IMAGES + ["val"] * VAL_IMAGES
        write_manifest(layout.manifest, pd.DataFrame({"index": range(images), "source": "synthetic", "label": 0, "split": split}))
        features = ShardedWriter(layout.features("layer3"), [ArraySpec("features", (images, channels, GRID, GRID), "float16",
                                 ("item", "channel", "y", "x"))], VAL_IMAGES, {"model_id": "bench"}, fingerprint="bench")
        for shard in features.pending():
            values = np.random.default_rng(shard).exponential(size=(VAL_IMAGES, channels, GRID, GRID))
            features.write(shard, {"features": values.astype(np.float16)})
        features.finalize()
        write_vectors(layout.fact_vectors, n, channels, rows_per_shard=16384)
        return run_child([sys.executable, "-m", "stages", "sae", "--params", "params.yaml"], project, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=262_144, help="N: training vectors of the small run")
    parser.add_argument("--factor", type=int, default=4, help="the large run has factor * N vectors")
    parser.add_argument("--channels", type=int, default=256, help="C: vector size")
    parser.add_argument("--concepts", type=int, default=512, help="the SAE's dictionary size")
    parser.add_argument("--batch-size", type=int, default=4096, help="training vectors per step")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: one epoch of the small run)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the stage (OMP_NUM_THREADS)")
    args = parser.parse_args()

    steps = args.steps or args.vectors // args.batch_size
    sae = {"expansion": args.concepts / args.channels, "k": 16, "aux_k": 64, "batch_size": args.batch_size,
           "warmup_epochs": 0, "decay_epochs": 0, "checkpoint_every": max(1, steps // 4)}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    peaks = []
    for n in (args.vectors, args.factor * args.vectors):
        peak, seconds = measure(n, args.channels, {**sae, "epochs": steps * args.batch_size / n}, env)  # the same steps at every N
        peaks.append(peak)
        print(f"N={n:8d}  C={args.channels}  store_f32={n * args.channels * 4 / 2**20:7.1f} MiB  peak_rss={peak:8.1f} MiB  "
              f"sae_seconds={seconds:6.1f}  steps={steps}  threads={args.threads}", flush=True)
    print(f"rss_ratio_{args.factor}x={peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
