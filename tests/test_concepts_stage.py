"""concepts stage: the toy concept file, stored embeddings and report, filters, bad inputs."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from lib.core.layout import Layout
from lib.core.params import load_params
from lib.core.schema import CLIP_MODEL_KEY, EMBED_DIM_KEY, IMAGE_EMB, TEXT_EMB
from lib.core.stores import open_store
from lib.data.manifest import read_manifest, split_indices
from lib.kernels.text import encode_texts
from lib.models.clip import load_clip
from lib.pipeline.concept_list import read_concept_list
from lib.pipeline.concepts import run_concepts
from lib.pipeline.stored_concepts import read_concepts
from lib.toy.train_clip import create_toy_clip, save_open_clip_checkpoint
from lib.toy.world import CONCEPTS
from stages.__main__ import app

REPO = Path(__file__).resolve().parents[1]
LONG = "an object with a checkerboard pattern"


def build(project: Path):  # type: ignore[no-untyped-def]
    config = load_params(project / "params.yaml")
    return run_concepts(config, Layout.from_params(config), torch.device("cpu"))


def test_toy_concept_file_is_the_ground_truth_then_distractors():
    listed = read_concept_list(REPO / "concepts/toy.txt")
    assert listed[:17] == [(c.name, c.type) for c in CONCEPTS]
    distractors = listed[17:]
    assert 4 <= len(distractors) <= 8
    words = {word for name, _ in distractors for word in name.split()}
    assert not words & {"red", "circle", "circles", "ring", "round", "oval", "ellipse", "disc", "dot", "dots"}
    templates = yaml.safe_load((REPO / "params.yaml").read_text())["concepts"]["templates"]
    assert {kind for _, kind in listed} - {None} <= set(templates)


def test_stage_stores_kept_embeddings_and_reports_every_concept(circled_inputs, enter_copy, set_params):
    project = enter_copy(circled_inputs)
    set_params(project / "params.yaml", "concepts", duplicate_threshold=1.0)  # random CLIP: texts are alike
    report = build(project)
    assert (report.n_listed, report.n_kept, report.dropped, report.embed_dim) == (23, 22, {"too long": 1}, 128)

    concepts = read_concepts("data/toy/concepts")
    listed = read_concept_list("concepts/toy.txt")
    assert concepts.names == tuple(name for name, _ in listed if name != LONG)
    assert concepts.types[:4] == ("color",) * 4 and concepts.types[-1] == "background"
    assert concepts.prompts[0] == "a blue object" and concepts.prompts[5] == "a square"
    assert concepts.prompts[10] == "a solid object" and concepts.prompts[13] == "grass"
    clip = load_clip("toy-clip", "local-dir:models/toy/clip")
    assert concepts.attrs[CLIP_MODEL_KEY] == clip.model_id and concepts.attrs[EMBED_DIM_KEY] == 128
    assert concepts.attrs["dropped"] == [
        {"name": LONG, "type": None, "prompt": LONG, "reason": "too long: 37 > 30 characters"}
    ]
    assert open_store("data/toy/concepts")[TEXT_EMB].dtype == np.float16
    expected = encode_texts(clip.model, clip.tokenizer, concepts.prompts)
    torch.testing.assert_close(concepts.text_emb, expected, atol=1e-3, rtol=0)  # fp16 storage

    table = pd.read_csv("data/toy/concepts.tsv", sep="\t")
    assert list(table.columns) == ["name", "type", "prompt", "kept", "reason"] and len(table) == 23
    assert table["kept"].sum() == 22 and table.loc[~table["kept"], "name"].tolist() == [LONG]


def test_activation_filter_uses_the_train_images(circled_inputs, enter_copy, set_params):
    project = enter_copy(circled_inputs)
    set_params(project / "params.yaml", "concepts", duplicate_threshold=1.0)
    build(project)
    table = pd.read_csv("data/toy/concepts.tsv", sep="\t")
    clip = load_clip("toy-clip", "local-dir:models/toy/clip")
    text = encode_texts(clip.model, clip.tokenizer, table["prompt"].tolist())
    rows = split_indices(read_manifest(Path("data/toy/manifest.parquet")), "train")
    train = open_store("data/toy/clip_images.zarr")[IMAGE_EMB].get_orthogonal_selection((rows,)).astype(np.float32)
    train = torch.nn.functional.normalize(torch.from_numpy(train), dim=-1)
    activation = (train @ text.T).topk(5, dim=0).values.mean(dim=0)
    cutoff = activation[table["name"] != LONG].median().item()

    set_params(project / "params.yaml", "concepts", duplicate_threshold=1.0, min_top5_similarity=cutoff)
    build(project)
    table = pd.read_csv("data/toy/concepts.tsv", sep="\t")
    expected = (activation >= cutoff).numpy() & (table["name"] != LONG).to_numpy()
    assert table["kept"].to_numpy().tolist() == expected.tolist()
    assert table.loc[~expected & (table["name"] != LONG).to_numpy(), "reason"].str.startswith("low activation").all()


@pytest.mark.parametrize(
    ("concept_file", "values", "message"),
    [
        ("# nothing but a comment\n\n", {}, "concept list is empty"),
        ("blue\tcolor\nstar\tshap\n", {}, "concepts.file: 'concepts/toy.txt' — line 2: unknown concept type 'shap'"),
        ("blue\tcolor\nstar\tshape\n", {"min_top5_similarity": 1.0}, "all 2 concepts were filtered out: {'low activation': 2}"),
        (None, {"file": "concepts/missing.txt"}, "concepts.file: 'concepts/missing.txt' — No such file or directory"),
    ],
)
def test_bad_concept_lists_fail_without_writing(circled_inputs, enter_copy, set_params, concept_file, values, message):
    project = enter_copy(circled_inputs)
    if concept_file is not None:
        (project / "concepts/toy.txt").write_text(concept_file)
    set_params(project / "params.yaml", "concepts", **values)
    result = CliRunner().invoke(app, ["concepts", "--params", "params.yaml"])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())  # rich wraps long lines
    assert not (project / "data/toy/concepts").exists()


def test_concepts_refuse_image_embeddings_made_by_another_clip(circled_inputs, enter_copy):
    project = enter_copy(circled_inputs)
    shutil.rmtree(project / "models/toy/clip")
    save_open_clip_checkpoint(create_toy_clip(seed=1), project / "models/toy/clip")  # same architecture, new weights
    result = CliRunner().invoke(app, ["concepts", "--params", "params.yaml"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "clip: clip_images and clip params come from different CLIPs: model_id" in output
    assert not (project / "data/toy/concepts").exists()
