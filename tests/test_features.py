"""features stage: stored maps equal a direct forward, interrupted runs resume to identical bytes."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core import stores
from lib.core.cli import progress
from lib.core.distributed import Ranks
from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.stores import open_store
from lib.data.prepare import prepare_toy
from lib.models.backbones import load_backbone
from lib.pipeline.features import FeaturesReport, check_features, run_features


@pytest.fixture(scope="module")
def toy_layout(prepared_toy) -> tuple[Params, Layout]:
    config = Params.model_validate(
        {
            "data": {"toy": {"n_train": 24, "n_val": 8, "n_test": 8}, "rows_per_shard": 16},
            "backbone": {"arch": "toy:cnn", "weights": None},
            "features": {"layers": ["layer2", "layer3"], "batch_size": 7},
        }
    )
    return config, prepared_toy(config.data)


def run(config: Params, layout: Layout) -> FeaturesReport:
    with progress() as bar:
        return run_features(config, layout, torch.device("cpu"), Ranks(), bar)


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_stored_features_equal_a_direct_forward(toy_layout: tuple[Params, Layout]) -> None:
    config, layout = toy_layout
    run(config, layout)
    stored = open_store(layout.features("layer3"))
    assert stored["features"].shape == (40, 128, 8, 8) and stored["features"].dtype == np.float16
    assert stored.attrs["model_id"].startswith("toy:cnn|random") and stored.attrs["layer"] == "layer3"
    torch.manual_seed(0)  # the stage seeds random inits the same way
    backbone = load_backbone("toy:cnn", None, num_classes=8)
    images = torch.from_numpy(open_store(layout.images)["images"][30:35])
    with torch.inference_mode():
        logits = backbone.model(backbone.preprocess(images))
    np.testing.assert_allclose(open_store(layout.logits)["logits"][30:35], logits.numpy(), rtol=1e-4, atol=1e-4)
    # the toy classes are the toy CNN's outputs, in order: an identity mapping
    assert open_store(layout.logits).attrs["class_map"] == {"outputs": list(range(8)), "n_outputs": 8, "how": "by name (toy world)"}


def test_interrupted_features_resume_to_identical_bytes(toy_layout: tuple[Params, Layout], monkeypatch: pytest.MonkeyPatch) -> None:
    config, layout = toy_layout
    run(config, layout)
    clean = {p: files(p) for p in (layout.features("layer3"), layout.logits)}
    for path in clean:  # a fresh run that crashes after the first shard of each store
        shutil.rmtree(path)
    original = stores.ShardedWriter.write
    calls = {"n": 0}

    def crashing_write(self, shard, blocks):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 3:  # three stores: the first shard of each is written, then the crash
            raise KeyboardInterrupt
        original(self, shard, blocks)

    monkeypatch.setattr(stores.ShardedWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        run(config, layout)
    monkeypatch.setattr(stores.ShardedWriter, "write", original)
    run(config, layout)
    assert {p: files(p) for p in clean} == clean


def test_new_image_content_rebuilds_the_features(
    toy_layout: tuple[Params, Layout], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stores are persistent across DVC runs: features of older images must never be resumed."""
    config, layout = toy_layout
    run(config, layout)
    copy = Layout(tmp_path / "toy")
    shutil.copytree(layout.root, copy.root)
    assert run(config, copy).shards_written == 0  # same images: every shard is reused
    before = open_store(copy.features("layer3")).attrs["fingerprint"]
    monkeypatch.setattr("lib.data.prepare.source_hash", lambda module: "an edited generator")
    with progress() as bar:
        prepare_toy(config.data, copy, bar)
    assert run(config, copy).shards_written == 3  # all shards (40 images, 16 per shard) rebuilt
    assert open_store(copy.features("layer3")).attrs["fingerprint"] != before


def test_stores_of_layers_no_longer_configured_are_removed(toy_layout: tuple[Params, Layout], tmp_path: Path) -> None:
    config, layout = toy_layout
    run(config, layout)
    copy = Layout(tmp_path / "toy")
    shutil.copytree(layout.root, copy.root)
    fewer = config.model_copy(update={"features": config.features.model_copy(update={"layers": ("layer3",)})})
    assert run(fewer, copy).removed == ["layer2"]
    assert sorted(p.name for p in copy.logits.parent.iterdir()) == ["layer3.zarr", "logits.zarr"]
    assert run(fewer, copy).removed == []


def test_unknown_layer_is_checked_before_any_work(toy_layout: tuple[Params, Layout]) -> None:
    config, _ = toy_layout
    check_features(config)
    bad = config.model_copy(update={"features": config.features.model_copy(update={"layers": ("layer2", "layer9")})})
    with pytest.raises(UserError, match=r"^features.layers: 'layer9' — layer 'layer9' not found in ToyCNN; closest: layer\d"):
        check_features(bad)
