"""Peak RAM of the circles stage at N and factor*N toy images: it must not grow with N.

    .venv/bin/python -m benchmarks.circles_memory [--images 512] [--factor 4] [--grid 7] [--threads 1]

For each size, in a temporary project folder: write a params.yaml (toy world of that many
images, the repository's circles settings unless overridden), run `python -m stages prepare`,
then `python -m stages circles` as a child process and read its peak resident set size
(ru_maxrss from wait4, so only that child counts). The CLIP is the repository's toy CLIP when
models/toy/clip exists, else a random-init one of the same architecture (same memory and FLOPs).
Prints one line per size and finally `ratio=<peak at factor*N / peak at N>`.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.rss import run_child
from lib.core.params import load_params
from lib.toy.models.clip import create_toy_clip, save_open_clip_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLIP_DIR = Path("models/toy/clip")


def measure(n_images: int, circles: dict, env: dict[str, str]) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of the circles stage on a fresh toy project of `n_images` images."""
    held_out = max(1, n_images // 10)
    params = {
        "runtime": {"device": "cpu"},
        "data": {"toy": {"n_train": n_images - 2 * held_out, "n_val": held_out, "n_test": held_out}},
        "circles": circles,
    }
    with tempfile.TemporaryDirectory(prefix="circles_memory_") as folder:
        project = Path(folder)
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        (project / CLIP_DIR).parent.mkdir(parents=True)
        if (REPO / CLIP_DIR).exists():
            (project / CLIP_DIR).symlink_to(REPO / CLIP_DIR)
        else:
            save_open_clip_checkpoint(create_toy_clip(seed=0), project / CLIP_DIR)
        stage = [sys.executable, "-m", "stages"]
        run_child([*stage, "prepare", "--params", "params.yaml"], project, env)
        return run_child([*stage, "circles", "--params", "params.yaml"], project, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="N: toy images of the small run")
    parser.add_argument("--factor", type=int, default=4, help="the large run has factor * N images")
    parser.add_argument("--grid", type=int, default=None, help="override circles.grid")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the stage (OMP_NUM_THREADS)")
    args = parser.parse_args()

    circles = load_params(REPO / "params.yaml").circles.model_dump(mode="json")
    if args.grid is not None:
        circles["grid"] = args.grid
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    peaks = []
    for n_images in (args.images, args.factor * args.images):
        peak, seconds = measure(n_images, circles, env)
        peaks.append(peak)
        print(f"N={n_images:6d}  peak_rss={peak:8.1f} MiB  circles_seconds={seconds:7.1f}  "
              f"grid={circles['grid']} threads={args.threads}", flush=True)
    print(f"ratio={peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
