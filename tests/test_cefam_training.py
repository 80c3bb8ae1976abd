"""CE-FAM translator training: data sources, learning, plateau and early stopping, resuming, the checkpoint."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lib.core.distributed import Ranks
from lib.core.errors import UserError
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.data.manifest import train_val_indices
from lib.methods.cefam.artifacts import TrainedTranslator, check_concepts, explained_layers, save_translator
from lib.methods.cefam.training import TrainSettings, evaluate_translator, split_source, train_translator
from lib.methods.cefam.translator import Translator

N, C, D, ROWS = 96, 12, 8, 16


def _store(path: Path, name: str, values: np.ndarray) -> None:
    spec = ArraySpec(name, values.shape, str(values.dtype), ("item", "dim")[: values.ndim])
    writer = ShardedWriter(path, [spec], ROWS, {}, fingerprint="test")
    for shard in writer.pending():
        writer.write(shard, {name: values[writer.rows(shard)]})
    writer.finalize()


@pytest.fixture(scope="module")
def arrays(tmp_path_factory: pytest.TempPathFactory):
    """z (N, C) and targets F.normalize(z @ W) (N, D) in stores; rows 0-63 train, 64-79 val, 80-95 test."""
    base = tmp_path_factory.mktemp("cefam_train")
    g = torch.Generator().manual_seed(0)
    z = torch.rand(N, C, generator=g)
    emb = F.normalize(z @ torch.randn(C, D, generator=g) + 0.3 * torch.randn(D, generator=g), dim=1)
    _store(base / "z.zarr", "z", z.half().numpy())
    _store(base / "emb.zarr", "emb", emb.half().numpy())
    return open_store(base / "z.zarr")["z"], open_store(base / "emb.zarr")["emb"]


TRAIN, VAL, TEST = np.arange(64), np.arange(64, 80), np.arange(80, 96)
TEXT = torch.randn(5, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("in_memory_mb", [1024.0, 0.0])
def test_sources_cover_every_row_once_per_epoch_and_repeat_per_epoch(arrays, in_memory_mb):
    z, emb = arrays
    source = split_source(z, emb, TRAIN, 10, shuffle=True, seed=3, in_memory_mb=in_memory_mb)
    reference = torch.from_numpy(z[:64]).float()

    def rows(epoch):
        batches = list(source(epoch))
        assert all(len(b) <= 10 for b, _ in batches) and batches[0][0].dtype == torch.float32
        seen = torch.cat([b for b, _ in batches])
        # rows identified by their values (z rows are distinct)
        return [int((reference == row).all(dim=1).nonzero()) for row in seen]

    first = rows(0)
    assert sorted(first) == list(range(64))
    assert rows(0) == first and rows(1) != first  # an epoch's order depends on (seed, epoch) alone
    plain = torch.cat([b for b, _ in split_source(z, emb, VAL, 7, in_memory_mb=in_memory_mb)(5)])
    torch.testing.assert_close(plain, torch.from_numpy(z[64:80]).float())  # unshuffled: row order


@pytest.mark.parametrize("in_memory_mb", [1024.0, 0.0])
def test_raw_targets_are_the_unit_embeddings_times_their_norms(arrays, tmp_path: Path, in_memory_mb):
    z, emb = arrays
    norms = np.linspace(0.5, 20.0, N).astype(np.float32)  # distinct per row, so a misaligned row shows
    _store(tmp_path / "norm.zarr", "norm", norms)
    norm = open_store(tmp_path / "norm.zarr")["norm"]
    source = split_source(z, emb, TRAIN, 10, shuffle=True, seed=3, in_memory_mb=in_memory_mb, norm=norm)
    reference = torch.from_numpy(z[:64]).float()
    for batch_z, batch_emb in source(0):
        rows = [int((reference == row).all(dim=1).nonzero()) for row in batch_z]
        expected = torch.from_numpy(emb[:64][rows]).float() * torch.from_numpy(norms[rows])[:, None]
        torch.testing.assert_close(batch_emb, expected)


def _train(arrays, settings, checkpoint=None, fingerprint="a", progress=None, init=0, text=TEXT):
    z, emb = arrays
    torch.manual_seed(init)
    model = Translator(C, D, hidden=(16,), scale=10.0)
    train = split_source(z, emb, TRAIN, 16, shuffle=True, seed=0)
    val = split_source(z, emb, VAL, 16)
    return train_translator(model, train, val, text, settings, checkpoint=checkpoint, fingerprint=fingerprint, progress=progress)


def test_training_learns_the_target_and_keeps_the_best_epoch(arrays):
    settings = TrainSettings(optimizer="adam", lr=1e-2, max_epochs=60, patience=60)
    model, history = _train(arrays, settings)
    assert len(history["epoch"]) == 60 and history["train_loss"][-1] < history["train_loss"][0] / 5
    z, emb = arrays
    test = evaluate_translator(model, split_source(z, emb, TEST, 8), TEXT, settings.lam)
    assert test["cos"] > 0.95 and test["corr"] > 0.9 and 0 <= test["agreement"] <= 1
    # the returned weights are the best epoch's: their val loss is the best one recorded
    val = evaluate_translator(model, split_source(z, emb, VAL, 16), TEXT, settings.lam)
    assert val["loss"] == pytest.approx(history["best_val_loss"], rel=1e-5)
    assert history["best_val_loss"] == min(history["val_loss"])


def test_evaluation_of_a_perfect_translator():
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    model = Translator(4, 4, hidden=(), scale=10.0)
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.eye(4))
        model.layers[0].bias.zero_()
    scores = evaluate_translator(model, lambda epoch: iter([(z, z)]), torch.randn(3, 4), 1e-3)
    assert scores == pytest.approx({"loss": 0.0, "cos": 1.0, "agreement": 1.0, "corr": 1.0})
    assert set(evaluate_translator(model, lambda epoch: iter([(z, z)]), None, 0.0)) == {"loss", "cos"}


def test_plateau_schedule_and_early_stopping(arrays):
    # a high SGD rate: val improves with noise until it plateaus; the rate halves after 2 epochs without a new best
    # (including before the final best), and training stops after 4
    settings = TrainSettings(optimizer="sgd", lr=2.0, max_epochs=80, plateau_patience=2, plateau_factor=0.5, patience=4)
    _, history = _train(arrays, settings)
    best = history["best_epoch"]
    assert history["stopped_early"] and history["epoch"][-1] == best + 4 < 79
    lr = history["lr"]
    assert lr[best + 1] == lr[best + 2] == lr[best] and lr[best + 3] == pytest.approx(lr[best] * 0.5)
    assert all(v >= history["best_val_loss"] for v in history["val_loss"][best + 1 :])  # no new best


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_result(arrays, tmp_path: Path):
    settings = TrainSettings(optimizer="adam", lr=1e-2, max_epochs=8, patience=8)
    full, full_history = _train(arrays, settings, checkpoint=tmp_path / "a.pt")

    def stop_after_three(epoch, metrics):
        if epoch == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(arrays, settings, checkpoint=tmp_path / "b.pt", progress=stop_after_three)
    resumed, history = _train(arrays, settings, checkpoint=tmp_path / "b.pt", init=99)  # another init: the checkpoint wins
    assert history["resumed_from"] == 3
    for key in ("epoch", "train_loss", "val_loss", "lr", "best_epoch"):
        assert history[key] == full_history[key]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a checkpoint of other inputs (another fingerprint) is ignored
    _, fresh = _train(arrays, settings, checkpoint=tmp_path / "b.pt", fingerprint="other")
    assert fresh["resumed_from"] == 0


def test_concept_free_training_needs_no_concepts(arrays):
    _, history = _train(arrays, TrainSettings(lam=0.0, optimizer="adam", lr=1e-2, max_epochs=3), text=None)
    assert len(history["epoch"]) == 3


def test_checkpoint_round_trip_and_what_it_was_trained_on(tmp_path: Path):
    model = Translator(6, 3, hidden=(5,), scale=30.0, bias=-2.0)
    path = tmp_path / "translator.pt"
    save_translator(path, model, ["layer1", "layer2"], [2, 4], ["red", "star"], 1e-3, "backbone-id", "clip-id", {"best_epoch": 3})
    trained = TrainedTranslator.load(path)
    assert (trained.layers, trained.channels, trained.concepts) == (("layer1", "layer2"), (2, 4), ("red", "star"))
    assert trained.backbone_id == "backbone-id" and trained.clip_id == "clip-id" and trained.state["best_epoch"] == 3
    z = torch.randn(2, 6)
    torch.testing.assert_close(trained.model(z), model(z))
    assert trained.model.scale.item() == 30.0 and not trained.model.training
    with pytest.raises(ValueError, match="do not make the translator's input"):
        save_translator(path, model, ["layer1"], [2], [], 0.0, "b", "c", {})

    assert explained_layers(trained, None) == ("layer1", "layer2") and explained_layers(trained, ["layer2"]) == ("layer2",)
    with pytest.raises(UserError, match=r"cefam.regions.layers: \['layer3'\] — the translator was trained on layers"):
        explained_layers(trained, ["layer3"])
    check_concepts(trained, ["red", "star"])
    with pytest.raises(UserError, match=r"concepts.file: .*added \['blue'\], removed \['star'\]"):
        check_concepts(trained, ["red", "blue"])
    with pytest.raises(UserError, match="another order"):
        check_concepts(trained, ["star", "red"])
    save_translator(path, model, ["layer1", "layer2"], [2, 4], ["red", "star"], 0.0, "b", "c", {})
    check_concepts(TrainedTranslator.load(path), ["anything", "else"])  # concept-free: any list
    with pytest.raises(UserError, match="no CE-FAM translator"):
        TrainedTranslator.load(tmp_path / "absent.pt")


def test_val_is_the_manifest_split_or_carved_from_train():
    manifest = pd.DataFrame({"index": range(10), "split": ["train"] * 6 + ["val"] * 2 + ["test"] * 2})
    train, val, carved = train_val_indices(manifest, 0.5, 0)
    assert train.tolist() == [0, 1, 2, 3, 4, 5] and val.tolist() == [6, 7] and not carved
    manifest["split"] = ["train"] * 8 + ["test"] * 2
    train, val, carved = train_val_indices(manifest, 0.25, 0)
    assert carved and len(val) == 2 and sorted([*train, *val]) == list(range(8)) and not set(train) & set(val)
    assert train_val_indices(manifest, 0.25, 0)[1].tolist() == val.tolist()  # seeded
    with pytest.raises(ValueError, match="both splits need images"):
        train_val_indices(manifest.assign(split="test"), 0.25, 0)


def test_ddp_on_two_ranks_equals_one_process_on_the_global_batch(ddp_results):
    from tests.ddp_worker import translator_case

    ddp, one = ddp_results["translator"], translator_case(Ranks())
    assert one["val_loss"][-1] < one["val_loss"][0]
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6)
