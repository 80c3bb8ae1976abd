"""Peak RAM of the stats stage at N and factor*N images: it must not grow with N.

    .venv/bin/python -m benchmarks.stats_memory [--images 4096] [--factor 4] [--concepts 2048] [--threads 2]

For each size, in a temporary project folder: write a synthetic FaCT-like concept_stats store
(sparse nonnegative presence, contributions of either sign on the present concepts; written shard
by shard, so this process stays small too) and dataset.json, then run `python -m stages stats` as
a child process and read its peak resident set size (benchmarks/rss.py). One (images x concepts)
float32 array is printed as `nxj`: a reduction that gathered presence and contributions would add
at least twice that at each size. Ends with `rss_ratio_4x=<peak at factor*N / peak at N>`.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from benchmarks.rss import run_child
from lib.core.layout import Layout
from lib.core.schema import CONTRIBUTION, PRED_BACKBONE, PRED_MODEL, PRESENCE, STATS_IMAGE, STATS_LABEL, concept_stats_specs
from lib.core.stores import ShardedWriter

REPO = Path(__file__).resolve().parents[1]
N_CLASSES = 100
DENSITY = 0.02  # share of concepts present in an image (FaCT: k of the dictionary per position, pooled)


def write_store(path: Path, n_images: int, n_concepts: int, rows_per_shard: int) -> None:
    """A synthetic concept_stats store; each shard drawn from its own seed (same content at any N)."""
    attributes = {"method": "salf", "split": "test", "concepts": [f"z{j}" for j in range(n_concepts)]}
    writer = ShardedWriter(path, concept_stats_specs(n_images, n_concepts), rows_per_shard, attributes, fingerprint="bench")
    for shard in writer.pending():
        rows = writer.rows(shard)
        rng = np.random.default_rng(shard)
        size = (rows.stop - rows.start, n_concepts)
        presence = (rng.exponential(size=size) * (rng.random(size) < DENSITY)).astype(np.float32)
        label = rng.integers(0, N_CLASSES, size[0])
        writer.write(shard, {
            STATS_IMAGE: np.arange(rows.start, rows.stop),
            STATS_LABEL: label,
            PRED_BACKBONE: np.where(rng.random(size[0]) < 0.8, label, rng.integers(0, N_CLASSES, size[0])),
            PRED_MODEL: np.where(rng.random(size[0]) < 0.7, label, rng.integers(0, N_CLASSES, size[0])),
            PRESENCE: presence,
            CONTRIBUTION: presence * rng.normal(0.3, 1.0, size).astype(np.float32),
        })
    writer.finalize()


def measure(n_images: int, n_concepts: int, rows_per_shard: int, env: dict[str, str]) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of the stats stage over a synthetic store of `n_images` images."""
    with tempfile.TemporaryDirectory(prefix="stats_memory_") as folder:
        project = Path(folder)
        params = {"runtime": {"device": "cpu"}, "data": {"name": "bench", "rows_per_shard": rows_per_shard}}
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        layout = Layout(project / "data" / "bench", project / "metrics")
        layout.root.mkdir(parents=True)
        layout.dataset_info.write_text(json.dumps({"classes": [f"class{k}" for k in range(N_CLASSES)]}))
        write_store(layout.concept_stats("salf"), n_images, n_concepts, rows_per_shard)
        return run_child([sys.executable, "-m", "stages", "stats", "--params", "params.yaml"], project, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="N: images of the small run")
    parser.add_argument("--factor", type=int, default=4, help="the large run has factor * N images")
    parser.add_argument("--concepts", type=int, default=2048, help="J: concepts per image")
    parser.add_argument("--rows-per-shard", type=int, default=256, help="images per shard (one dask chunk)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (dask's local threads and OMP_NUM_THREADS)")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads), "DASK_NUM_WORKERS": str(args.threads)}
    peaks = []
    for n_images in (args.images, args.factor * args.images):
        peak, seconds = measure(n_images, args.concepts, args.rows_per_shard, env)
        peaks.append(peak)
        print(f"N={n_images:7d}  J={args.concepts}  nxj={n_images * args.concepts * 4 / 2**20:7.1f} MiB  "
              f"peak_rss={peak:8.1f} MiB  stats_seconds={seconds:6.1f}  threads={args.threads}", flush=True)
    print(f"rss_ratio_{args.factor}x={peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
