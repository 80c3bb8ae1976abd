"""similarity stage: stored P, the marker when not materialised, mismatched CLIPs, and what DVC re-runs."""

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
from typer.testing import CliRunner

from lib.core.cli import progress
from lib.core.distributed import Ranks
from lib.core.layout import Layout
from lib.core.params import load_params
from lib.core.schema import CIRCLES, CLIP_MODEL_KEY, P
from lib.core.stores import open_store
from lib.kernels.similarity import similarity_batch
from lib.pipeline.concepts import run_concepts
from lib.pipeline.similarity import run_similarity
from lib.pipeline.stored_concepts import read_concepts
from lib.toy.train_clip import create_toy_clip, save_open_clip_checkpoint
from stages.__main__ import app

REPO = Path(__file__).resolve().parents[1]
CLIP_STAGES = ("circles", "concepts", "similarity")


def concepts_then_similarity(project: Path):  # type: ignore[no-untyped-def]
    config = load_params(project / "params.yaml")
    layout = Layout.from_params(config)
    run_concepts(config, layout, torch.device("cpu"))
    with progress() as bar:
        return run_similarity(config, layout, torch.device("cpu"), Ranks(), bar)


def test_materialised_p_is_the_cosine_of_stored_embeddings(circled_inputs, enter_copy):
    project = enter_copy(circled_inputs)
    report = concepts_then_similarity(project)
    assert (report.shape, report.materialized, report.shards_written) == ((40, 22, 3, 3), True, 3)
    store = open_store("data/toy/similarity.zarr")
    assert store[P].shape == (40, 22, 3, 3) and store[P].dtype == np.float16
    concepts = read_concepts("data/toy/concepts")
    assert store.attrs["concepts"] == list(concepts.names) and store.attrs["materialized"] is True
    circles = open_store("data/toy/circles.zarr")
    assert store.attrs[CLIP_MODEL_KEY] == circles.attrs[CLIP_MODEL_KEY]
    expected = similarity_batch(torch.from_numpy(circles[CIRCLES][:]), concepts.text_emb)
    np.testing.assert_allclose(store[P][:], expected.numpy(), atol=2e-3, rtol=0)  # fp16 P


def test_unmaterialised_similarity_is_a_marker(circled_inputs, enter_copy, set_params):
    project = enter_copy(circled_inputs)
    set_params(project / "params.yaml", "similarity", materialize=False)
    report = concepts_then_similarity(project)
    assert (report.shape, report.materialized, report.shards_written) == ((40, 22, 3, 3), False, 0)
    marker = open_store("data/toy/similarity.zarr")  # complete, so later stages may open it
    assert marker.attrs["materialized"] is False and list(marker.array_keys()) == []
    assert marker.attrs["concepts"] == list(read_concepts("data/toy/concepts").names)

    set_params(project / "params.yaml", "similarity", materialize=True)
    assert concepts_then_similarity(project).shards_written == 3
    assert open_store("data/toy/similarity.zarr")[P].shape == (40, 22, 3, 3)


def test_similarity_refuses_circles_and_concepts_of_different_clips(circled_inputs, enter_copy):
    project = enter_copy(circled_inputs)
    runner = CliRunner()
    assert runner.invoke(app, ["concepts", "--params", "params.yaml"]).exit_code == 0
    shutil.rmtree(project / "models/toy/clip")
    save_open_clip_checkpoint(create_toy_clip(seed=1), project / "models/toy/clip")
    assert runner.invoke(app, ["circles", "--params", "params.yaml"]).exit_code == 0  # circles now from the new CLIP
    result = runner.invoke(app, ["similarity", "--params", "params.yaml"])
    assert result.exit_code == 2
    assert "circles and concepts come from different CLIPs: model_id" in " ".join(result.output.split())
    assert not (project / "data/toy/similarity.zarr").exists()


def dvc_status(repo: Repo) -> set[str]:
    """Names of the CLIP-side stages whose deps, params or outs changed since they last ran."""
    return set(repo.status(targets=list(CLIP_STAGES)))


def test_changing_concepts_reruns_concepts_and_similarity_never_circles(tmp_path, monkeypatch):
    """`dvc status` in a copy of the repository's dvc.yaml and params.yaml, every dependency a stand-in file."""
    monkeypatch.chdir(tmp_path)  # DVC resolves some paths against the working directory
    for name in ("dvc.yaml", "params.yaml", "concepts/toy.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    Repo.init(tmp_path, no_scm=True)
    repo = Repo(tmp_path)
    for name in CLIP_STAGES:
        (stage,) = repo.stage.collect(name)
        for path in [*stage.deps, *stage.outs]:
            standin = tmp_path / path.def_path
            if not isinstance(path, ParamsDependency) and not standin.exists():
                standin.parent.mkdir(parents=True, exist_ok=True)
                standin.write_text(path.def_path)
        repo.commit(name, force=True)  # record the stage as run on the current files
    assert dvc_status(repo) == set()

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["concepts"]["templates"]["shape"] = "a photo of a {}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with (tmp_path / "concepts/toy.txt").open("a") as concept_file:
        concept_file.write("hexagonal\tshape\n")
    assert dvc_status(repo) == {"concepts"}
    (tmp_path / "data/toy/concepts").write_text("new text embeddings")  # what re-running concepts does
    assert dvc_status(repo) == {"concepts", "similarity"}

    params["circles"]["grid"] = 5  # the check can fail: circles does follow its own params
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert dvc_status(repo) == {"circles", "concepts", "similarity"}
