"""Shared pytest fixtures."""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml

if TYPE_CHECKING:
    from lib.core.layout import Layout


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test tensors are tiny: intra-op threads only add contention on a shared CPU. Session-scoped
    so that module-scoped fixtures (which run before any function-scoped one) get it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """run(*args, cwd=None, nproc=2): `python -m torch.distributed.run --standalone --nproc-per-node nproc
    *args` (e.g. "-m", "stages", "circles", "--params", "params.yaml") on CPU ranks (gloo), the
    repository importable; asserts it succeeded and returns the result (the stages' summaries are in
    its stderr). torchrun gives each rank OMP_NUM_THREADS=1, like the tests' single thread."""

    def run(*args: str, cwd: Path | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run


@pytest.fixture(scope="session")
def ddp_results(torchrun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """{case: result} of every training case of tests/ddp_worker.py, trained with DDP on 2 CPU ranks."""
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    torchrun("tests/ddp_worker.py", str(out), cwd=REPO)
    return torch.load(out)


@pytest.fixture(scope="session")
def prepared_toy(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., "Layout"]:
    """make(data: DataParams) -> the Layout of a freshly prepared toy world in its own temporary
    folder (data/<data.name>/ and metrics/ under it). Usable from module-scoped fixtures."""
    from lib.core.cli import progress
    from lib.core.layout import Layout
    from lib.data.prepare import prepare_toy

    def make(data) -> Layout:  # noqa: ANN001  (DataParams; imported lazily)
        base = tmp_path_factory.mktemp("toy")
        layout = Layout(base / "data" / data.name, base / "metrics")
        layout.root.mkdir(parents=True)
        with progress() as bar:
            prepare_toy(data, layout, bar)
        return layout

    return make


# ---------------------------------------------------------------------------------------------
# CLIP side (circles, concepts, similarity): a tiny random CLIP and a tiny toy project on disk.
# Heavy imports stay inside the fixtures so test files that do not use them start fast.
TINY_CLIP_SIZE = 32


@pytest.fixture(scope="session")
def tiny_clip():
    """A random-init open_clip CLIP (32 px input, D=32, 49408-token vocabulary) for CPU tests; eval mode."""
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=TINY_CLIP_SIZE, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
        )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def clip_preprocess():
    """OpenAI CLIP normalisation at `tiny_clip`'s input size (images of that size are not resized)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from lib.kernels.preprocess import Preprocess

    return Preprocess(TINY_CLIP_SIZE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


@pytest.fixture(scope="session")
def toy_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repository for the CLIP-side stages: params.yaml (40 toy images in
    shards of 16, a 3 x 3 circle grid, the repository's concept templates), data/toy prepared,
    concepts/toy.txt and a random-init toy CLIP at models/toy/clip. Copy it before writing to it."""
    from lib.core.cli import progress
    from lib.core.layout import Layout
    from lib.core.params import Params
    from lib.data.prepare import prepare_toy
    from lib.toy.models.clip import create_toy_clip, save_open_clip_checkpoint

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("toy_inputs")
    raw = {
        "runtime": {"device": "cpu"},
        "data": {"toy": {"n_train": 24, "n_val": 8, "n_test": 8}, "rows_per_shard": 16},
        "clip_images": {"autocast": False},
        "circles": {"grid": 3, "radius": 12.0, "width": 2.0, "batch_size": 7, "chunk": 64, "autocast": False},
        # the repository's templates; its activation cutoff is tuned to the trained toy CLIP, not a random one
        "concepts": {**yaml.safe_load((repo / "params.yaml").read_text())["concepts"], "min_top5_similarity": -1.0},
        "similarity": {"batch_size": 5},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    config = Params.model_validate(raw)
    layout = Layout.from_params(config, base=root / "data")
    layout.root.mkdir(parents=True)
    with progress() as bar:
        prepare_toy(config.data, layout, bar)
    (root / "concepts").mkdir()
    shutil.copy(repo / config.concepts.file, root / config.concepts.file)
    save_open_clip_checkpoint(create_toy_clip(seed=0), root / "models" / "toy" / "clip")
    return root


@pytest.fixture
def enter_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Path]:
    """copy(source) -> a copy of the project folder `source` in tmp_path, made the working directory
    (stages resolve data/, models/ and concept files relative to it)."""

    def copy(source: Path) -> Path:
        target = tmp_path / "project"
        shutil.copytree(source, target)
        monkeypatch.chdir(target)
        return target

    return copy


@pytest.fixture
def set_params() -> Callable[..., None]:
    """update(path, section, **values): set keys of one section of a params file in place."""

    def update(path: Path, section: str, **values: object) -> None:
        raw = yaml.safe_load(path.read_text())
        raw.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(raw))

    return update


@pytest.fixture(scope="session")
def circled_inputs(toy_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`toy_inputs` after the clip_images and circles stages (data/toy/clip_images.zarr, circles.zarr
    written). Copy it before writing to it."""
    from lib.core.cli import progress
    from lib.core.distributed import Ranks
    from lib.core.layout import Layout
    from lib.core.params import load_params
    from lib.pipeline.circles import run_circles
    from lib.pipeline.clip_images import run_clip_images

    root = tmp_path_factory.mktemp("circled") / "project"
    shutil.copytree(toy_inputs, root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before `one_thread`
    with pytest.MonkeyPatch.context() as patch, progress() as bar:
        patch.chdir(root)  # the CLIP and the stores are found relative to the project
        config = load_params("params.yaml")
        for run in (run_clip_images, run_circles):
            run(config, Layout.from_params(config), torch.device("cpu"), Ranks(), bar)
    torch.set_num_threads(threads)
    return root
