"""Params profiles (profiles/*.yaml) and the papers' defaults in the schema."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lib.core.params import Params
from lib.core.profile import apply_profile, overrides
from lib.pipeline.similarity import materialize_p, p_bytes

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


def merged(profile: Path) -> Params:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return Params.model_validate(apply_profile(base, yaml.safe_load(profile.read_text())))


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_validates_on_params_yaml(profile):
    merged(profile)


def test_imagenet_profile_has_salf_cbms_imagenet_settings():
    config = merged(REPO / "profiles" / "imagenet.yaml")
    assert (config.clip.model, config.clip.pretrained.partition("@")[0]) == ("ViT-B-16", "openai")
    assert (config.circles.grid, config.circles.radius, config.circles.width) == (7, 32.0, 2.0)
    assert config.backbone.arch == "torchvision:resnet50" and config.backbone.weights.startswith("IMAGENET1K_V1@")
    assert config.features.layers[-1] == "layer4" and config.cbl.layer is None  # the bottleneck reads layer4
    concepts = config.concepts
    # LF-CBM's imagenet_filtered.txt as it is: its class and duplicate filters were applied when it was made
    assert (concepts.max_chars, concepts.class_similarity_threshold, concepts.duplicate_threshold) == (30, None, None)
    assert not config.clip_images.dense and config.data.imagefolder.shuffle_seed is not None
    assert concepts.min_top5_similarity == 0.28 and config.cbl.cos3_threshold == 0.45
    # LF-CBM's --lam 1e-4 is glm_saga's max_reg, divided by alpha: the objective's lambda is 1e-4 / 0.99
    assert config.sparse.lam == pytest.approx(1e-4 / 0.99, rel=1e-15) and config.sparse.alpha == 0.99
    assert (config.sparse.max_epochs, config.sparse.batch_size, config.sparse.step_size) == (80, 256, 0.1)
    # P on the fly: 1.28 M train images x LF-CBM's 4751 concepts x 7 x 7 (before any filter)
    shape = (1_281_167, 4751, 7, 7)
    assert config.similarity.materialize == "auto" and p_bytes(shape) > 500e9
    assert not materialize_p(config.similarity.materialize, shape, config.similarity.max_stored_gb)


def test_materialize_auto_stores_p_only_under_the_budget():
    toy = (4200, 17, 7, 7)
    assert p_bytes(toy) == 4200 * 17 * 49 * 2 and materialize_p("auto", toy, 20.0)
    assert not materialize_p("auto", toy, 0.005) and materialize_p(True, (10**7, 10**4, 7, 7), 1.0)
    assert not materialize_p(False, toy, 20.0)


def test_schema_defaults_are_the_papers_and_params_yaml_the_toy_worlds():
    defaults = Params()
    concepts = defaults.concepts  # LF-CBM's filters
    assert (concepts.class_similarity_threshold, concepts.duplicate_threshold, concepts.min_top5_similarity) == (0.85, 0.9, 0.25)
    assert concepts.max_chars == 30 and defaults.cbl.cos3_threshold == 0.45 and defaults.cbl.max_steps == 1000
    assert (defaults.circles.grid, defaults.circles.radius, defaults.circles.width) == (7, 32.0, 2.0)
    assert defaults.sparse.alpha == 0.99 and defaults.similarity.materialize == "auto"
    toy = yaml.safe_load((REPO / "params.yaml").read_text())
    assert toy["concepts"]["class_similarity_threshold"] == 1.0 and toy["circles"]["radius"] == 10.0


def test_dvc_applies_the_printed_overrides_like_apply_profile(tmp_path):
    """`python -m lib.core.profile P | xargs dvc exp run` sets exactly the merged params."""
    from dvc.utils.hydra import apply_overrides

    profile = REPO / "profiles" / "imagenet.yaml"
    printed = subprocess.run(
        [sys.executable, "-m", "lib.core.profile", str(profile)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    args = shlex.split(printed)  # what xargs passes on
    assert args[::2] == ["-S"] * (len(args) // 2)
    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    apply_overrides(target, args[1::2])
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    assert yaml.safe_load(target.read_text()) == apply_profile(base, yaml.safe_load(profile.read_text()))
    assert overrides({"a": {"b": 1}}, {"a": {"b": 2, "c": "x y"}}) == ["a.b=2", '+a.c="x y"']


def test_cefam_authors_profile_is_the_authors_translator_recipe():
    translator = merged(REPO / "profiles" / "cefam-authors.yaml").cefam.translator
    assert (translator.optimizer, translator.lr, translator.momentum, translator.batch_size) == ("sgd", 0.1, 0.0, 256)
    assert (translator.targets, translator.lam, translator.augment, translator.crop_scale) == ("raw", 1e-3, True, (0.08, 1.0))
    assert (translator.plateau_factor, translator.plateau_patience, translator.patience, translator.max_epochs) == (0.1, 6, 10, 150)
