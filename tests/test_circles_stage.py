"""circles stage: the stored embeddings, crash + resume, two torchrun ranks, bad geometry."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lib import stores
from lib.circle_store import CIRCLES, GLOBAL, extract_circles
from lib.circles import CircleEncoder
from lib.cli import app, progress
from lib.distributed import Ranks
from lib.layout import Layout
from lib.models.clip import load_clip
from lib.params import load_params
from lib.similarity import CLIP_MODEL_KEY, EMBED_DIM_KEY
from lib.stores import IncompleteStoreError, open_store
from stages import circles as _circles_stage  # noqa: F401  (registers the command)

REPO = Path(__file__).resolve().parents[1]


def run_circles(project: Path) -> int:
    """Run the stage's work in `project` (the working directory); returns the shards written."""
    config = load_params(project / "params.yaml")
    with progress() as bar:
        return extract_circles(config, Layout.from_params(config), torch.device("cpu"), Ranks(), bar).shards_written


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_stored_embeddings_equal_the_encoder(toy_inputs, enter_copy):
    project = enter_copy(toy_inputs)
    assert run_circles(project) == 3  # 40 images in shards of 16
    store = open_store("data/toy/circles.zarr")
    circles, plain = store[CIRCLES], store[GLOBAL]
    assert circles.shape == (40, 3, 3, 128) and circles.dtype == np.float16
    assert plain.shape == (40, 128) and plain.dtype == np.float16
    clip = load_clip("toy-clip", "local-dir:models/toy/clip")
    attrs = store.attrs
    assert attrs[CLIP_MODEL_KEY] == clip.model_id and attrs[EMBED_DIM_KEY] == 128
    assert (attrs["stage"], attrs["grid"], attrs["radius"], attrs["width"], attrs["color"]) == (
        "circles", 3, 12.0, 2.0, [255, 0, 0]
    )
    assert attrs["input_size"] == 64 and "batch_size" not in attrs

    rows = slice(13, 20)  # straddles the first shard boundary
    images = torch.from_numpy(open_store("data/toy/images.zarr")["images"][rows])
    expected = CircleEncoder(clip.model, clip.preprocess, 3, 12.0, 2.0, autocast=False)(images)
    # fp16 storage: unit vectors keep ~3 significant digits
    np.testing.assert_allclose(circles[rows], expected[0].numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(plain[rows], expected[1].numpy(), atol=1e-3, rtol=0)


def test_crash_then_rerun_equals_a_clean_run(toy_inputs, enter_copy, monkeypatch):
    project = enter_copy(toy_inputs)
    run_circles(project)
    path = project / "data/toy/circles.zarr"
    clean = files(path)
    shutil.rmtree(path)

    original = stores.ShardedWriter.write

    def crash_after_first_shard(self, shard, blocks):  # type: ignore[no-untyped-def]
        if self.done[:].any():
            raise KeyboardInterrupt  # as if killed while computing the second shard
        original(self, shard, blocks)

    monkeypatch.setattr(stores.ShardedWriter, "write", crash_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        run_circles(project)
    monkeypatch.setattr(stores.ShardedWriter, "write", original)
    with pytest.raises(IncompleteStoreError, match="1 shards finished"):
        open_store(path)
    assert run_circles(project) == 2  # the finished shard is kept
    assert files(path) == clean


def test_two_torchrun_ranks_write_the_one_rank_store(toy_inputs, enter_copy):
    project = enter_copy(toy_inputs)
    run_circles(project)
    one_rank = files(project / "data/toy/circles.zarr")
    shutil.rmtree(project / "data/toy/circles.zarr")
    # torchrun sets OMP_NUM_THREADS=1 per rank, matching this process's single thread.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stages", "circles", "--params", "params.yaml"]
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # each rank computed only its own shards (rank 0: shards 0 and 2, rank 1: shard 1)
    assert result.stderr.count("circles: 40 images") == 2
    assert "2 shards written" in result.stderr and "1 shards written" in result.stderr
    assert files(project / "data/toy/circles.zarr") == one_rank


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"grid": 64}, "grid=64 is larger than the image (size=64)"),
        ({"radius": 0.0}, "circles.radius: 0.0 — Input should be greater than 0"),
        ({"radius": 90.0}, "radius=90.0 is too large for size=64, grid=3"),
        ({"width": 30.0}, "width=30.0 must be < 2 * radius = 24.0"),
    ],
)
def test_bad_geometry_fails_before_any_work(toy_inputs, enter_copy, set_params, values, message):
    project = enter_copy(toy_inputs)
    set_params(project / "params.yaml", "circles", **values)
    result = CliRunner().invoke(app, ["circles", "--params", "params.yaml"])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())  # rich wraps long lines
    assert not (project / "data/toy/circles.zarr").exists()
