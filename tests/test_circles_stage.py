"""circles stage: the stored embeddings, crash + resume, two torchrun ranks, bad geometry."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lib.core import stores
from lib.core.cli import progress
from lib.core.distributed import Ranks
from lib.core.layout import Layout
from lib.core.params import load_params
from lib.core.schema import CIRCLES, CLIP_MODEL_KEY, EMBED_DIM_KEY, IMAGE_EMB, IMAGE_NORM
from lib.core.stores import IncompleteStoreError, open_store
from lib.kernels.rings import CircleEncoder
from lib.models.clip import load_clip
from lib.pipeline import circles as circles_stage
from lib.pipeline.clip_images import run_clip_images
from stages.__main__ import app


def run_circles(project: Path) -> int:
    """Run the stage's work in `project` (the working directory); returns the shards written."""
    config = load_params(project / "params.yaml")
    with progress() as bar:
        return circles_stage.run_circles(config, Layout.from_params(config), torch.device("cpu"), Ranks(), bar).shards_written


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_stored_embeddings_equal_the_encoder(toy_inputs, enter_copy):
    project = enter_copy(toy_inputs)
    assert run_circles(project) == 3  # 40 images in shards of 16
    store = open_store("data/toy/circles.zarr")
    circles = store[CIRCLES]
    assert circles.shape == (40, 3, 3, 128) and circles.dtype == np.float16
    assert sorted(store.array_keys()) == [CIRCLES, "shard_done"]  # the plain images live in clip_images.zarr
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
    np.testing.assert_allclose(circles[rows], expected.numpy(), atol=1e-3, rtol=0)


def test_clip_images_store_holds_the_plain_image_embeddings(toy_inputs, enter_copy):
    project = enter_copy(toy_inputs)
    config = load_params(project / "params.yaml")
    with progress() as bar:
        report = run_clip_images(config, Layout.from_params(config), torch.device("cpu"), Ranks(), bar)
    assert report.shards_written == 3 and report.precision in ("fp32", "bf16")
    emb = open_store("data/toy/clip_images.zarr")[IMAGE_EMB]
    assert emb.shape == (40, 128) and emb.dtype == np.float16
    clip = load_clip("toy-clip", "local-dir:models/toy/clip")
    images = torch.from_numpy(open_store("data/toy/images.zarr")["images"][:8])
    with torch.inference_mode():
        raw = clip.model.encode_image(clip.preprocess(images))
    expected = torch.nn.functional.normalize(raw, dim=-1)
    tolerance = 1e-3 if report.precision == "fp32" else 3e-2  # bf16 keeps ~3 significant digits
    np.testing.assert_allclose(emb[:8], expected.numpy(), atol=tolerance, rtol=0)
    # the raw embeddings' norms: unit embedding times norm gives CLIP's raw output back (CE-FAM's targets)
    norm = open_store("data/toy/clip_images.zarr")[IMAGE_NORM]
    assert norm.shape == (40,) and norm.dtype == np.float32
    np.testing.assert_allclose(norm[:8], raw.norm(dim=-1).numpy(), rtol=tolerance)
    np.testing.assert_allclose(emb[:8] * norm[:8][:, None], raw.numpy(), atol=tolerance * raw.abs().max().item(), rtol=0)


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
    # the unfinished store waits in the scratch area, outside the stage's DVC output
    scratch = project / "data/toy/.partial/circles.zarr"
    assert not path.exists() and scratch.exists()
    with pytest.raises(IncompleteStoreError, match="1 shards finished"):
        open_store(path)
    assert run_circles(project) == 2  # the finished shard is kept
    assert files(path) == clean and not scratch.exists()


def test_two_torchrun_ranks_write_the_one_rank_stores(circled_inputs, enter_copy, torchrun):
    """circles and clip_images: each rank computes only its own shards (rank 0: shards 0 and 2, rank 1:
    shard 1), and the stores equal the one-process ones (circled_inputs) byte for byte."""
    project = enter_copy(circled_inputs)
    stores = [project / "data/toy/circles.zarr", project / "data/toy/clip_images.zarr"]
    one_rank = [files(path) for path in stores]
    for path in stores:
        shutil.rmtree(path)
    for stage in ("circles", "clip-images"):
        result = torchrun("-m", "stages", stage, "--params", "params.yaml", cwd=project)
        assert result.stderr.count("40 images") == 2
        assert "2 shards written" in result.stderr and "1 shards written" in result.stderr
    assert [files(path) for path in stores] == one_rank


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
