"""Concept sets as LF-CBM made them: filters that can be off, class names from WordNet ids, and
LF-CBM's (sentence + 3 CLIP) / 4 similarity when a sentence encoder is given."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import load_params
from lib.models.classes import class_words
from lib.pipeline import concepts as concepts_stage
from lib.pipeline.concept_list import filter_concepts, text_similarity
from lib.pipeline.sentence import load_sentence_encoder

# ImageNet classes 0 and 1 as ImageNet's folders name them
TENCH, GOLDFISH = "n01440764", "n01443537"


def test_class_words_reads_wordnet_ids_through_the_class_index():
    assert class_words([TENCH, GOLDFISH, "desert_star", "n99999999"]) == ["tench", "goldfish", "desert star", "n99999999"]


def test_null_thresholds_switch_the_class_and_duplicate_filters_off():
    names = ["stripes", "striped", "goldfish"]
    text = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])  # "striped" is a near-duplicate of "stripes"
    goldfish = torch.tensor([[0.0, 1.0]])  # the class "goldfish" is the concept "goldfish"
    on = dict(class_names=["goldfish"], class_emb=goldfish, class_similarity_threshold=0.85, duplicate_threshold=0.9)
    kept, reasons = filter_concepts(names, text, None, **on)
    assert kept.tolist() == [True, False, False]
    assert reasons[1].startswith("near-duplicate: of 'stripes' cos 0.99")
    assert reasons[2].startswith("similar to class: 'goldfish' cos 1.000")
    off = {**on, "class_similarity_threshold": None, "duplicate_threshold": None}
    kept, reasons = filter_concepts(names, text, None, **off)
    assert kept.all() and reasons == [None] * 3


def test_lf_cbm_similarity_is_a_quarter_sentence_three_quarters_clip():
    clip = torch.tensor([[3.0, 0.0], [3.0, 4.0]])  # cosine 0.6 (norms 3 and 5)
    sentence = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # cosine 0
    assert text_similarity(clip[:1], clip[1:]).item() == pytest.approx(0.6)
    assert text_similarity(clip[:1], clip[1:], sentence[:1], sentence[1:]).item() == pytest.approx((0 + 3 * 0.6) / 4)
    # a CLIP near-duplicate (0.95) that the sentence encoder tells apart (0.2) is kept under the mix: (0.2 + 2.85) / 4 = 0.7625
    text = torch.tensor([[1.0, 0.0], [0.95, 0.3122499]])
    words = torch.tensor([[1.0, 0.0], [0.2, 0.9797959]])
    assert not filter_concepts(["a", "b"], text, None, duplicate_threshold=0.9)[0][1]
    kept, reasons = filter_concepts(["a", "b"], text, None, duplicate_threshold=0.7, sentence_emb=words)
    assert not kept[1] and reasons[1] == "near-duplicate: of 'a' sim 0.762 > 0.7"
    assert filter_concepts(["a", "b"], text, None, duplicate_threshold=0.9, sentence_emb=words)[0].all()


def _axis_encoder():
    """A stand-in sentence encoder: each distinct text its own axis (cosine 1 with itself, 0 with others)."""
    axes: dict[str, int] = {}

    def encode(texts):
        rows = torch.zeros(len(texts), 256)
        for i, text in enumerate(texts):
            rows[i, axes.setdefault(text, len(axes))] = 1.0
        return rows

    return encode


def _wordnet_project(project: Path) -> None:
    """The toy project with its first two classes named by WordNet ids and a concept 'goldfish' added."""
    info = json.loads(Path("data/toy/dataset.json").read_text())
    info["classes"][:2] = [TENCH, GOLDFISH]
    Path("data/toy/dataset.json").write_text(json.dumps(info))
    with open("concepts/toy.txt", "a") as concepts:
        concepts.write("goldfish\n")


def _report(project: Path) -> pd.DataFrame:
    config = load_params(project / "params.yaml")
    concepts_stage.run_concepts(config, Layout.from_params(config), torch.device("cpu"))
    return pd.read_csv("data/toy/concepts.tsv", sep="\t").set_index("name")


def test_the_class_filter_compares_concepts_with_the_class_names_of_wordnet_ids(circled_inputs, enter_copy, set_params):
    project = enter_copy(circled_inputs)
    _wordnet_project(project)
    set_params(project / "params.yaml", "concepts", class_similarity_threshold=0.85, duplicate_threshold=None, min_top5_similarity=-1.0)
    table = _report(project)
    # the class n01443537 is read as "goldfish", the very text of the concept: cosine 1
    assert table.loc["goldfish", "reason"] == "similar to class: 'goldfish' cos 1.000 > 0.85"


def test_a_sentence_model_mixes_into_the_stages_filters(circled_inputs, enter_copy, set_params, monkeypatch, tmp_path):
    project = enter_copy(circled_inputs)
    _wordnet_project(project)
    set_params(project / "params.yaml", "concepts", class_similarity_threshold=0.85, duplicate_threshold=0.8, min_top5_similarity=-1.0)
    clip_only = _report(project)
    # the random CLIP's prompts are alike (cosines up to 0.90): under CLIP alone some are near-duplicates
    assert clip_only["reason"].str.startswith("near-duplicate", na=False).any()
    monkeypatch.setattr(concepts_stage, "load_sentence_encoder", lambda path, device: _axis_encoder())
    set_params(project / "params.yaml", "concepts", sentence_model=str(tmp_path))
    mixed = _report(project)
    # distinct texts: sentence cosine 0, so (0 + 3 CLIP) / 4 <= 0.75 * 0.90 < 0.8; the class's own text still scores 1
    assert not mixed["reason"].str.startswith("near-duplicate", na=False).any()
    assert mixed.loc["goldfish", "reason"] == "similar to class: 'goldfish' sim 1.000 > 0.85"


def test_sentence_model_errors_name_the_key(circled_inputs, enter_copy, set_params, tmp_path):
    project = enter_copy(circled_inputs)
    set_params(project / "params.yaml", "concepts", sentence_model=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"^concepts.sentence_model: '.*nowhere' — not a directory"):
        concepts_stage.check_concepts(load_params(project / "params.yaml"))
    if importlib.util.find_spec("sentence_transformers") is None:
        with pytest.raises(UserError, match="optional package sentence-transformers"):
            load_sentence_encoder(str(tmp_path), torch.device("cpu"))
