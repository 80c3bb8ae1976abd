"""FaCT's stages end to end on a tiny toy project (random toy B-cos and CLIP): sae-data, sae (and its
resume after a kill), contributions (completeness on B-cos, the stats store, metrics, matching, C²),
fact-explain, evaluate's fact adapter; the toy CNN reports its completeness error instead."""

import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from bcos.common import gradient_to_image

from lib.core.distributed import Ranks
from lib.core.layout import Layout
from lib.core.params import Params, load_params
from lib.core.schema import CONTRIBUTION, DENSE, PRED_BACKBONE, PRED_MODEL, PRESENCE, STATS_IMAGE, STATS_LABEL
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.data.manifest import read_dataset_info, read_manifest, split_indices, train_val_indices
from lib.evaluate.adapters import METHODS
from lib.evaluate.registry import EvalBatch, EvalContext
from lib.evaluate.truth import GroundTruth
from lib.methods.fact.artifacts import load_sae
from lib.methods.fact.backbone import load_fact_backbone
from lib.methods.fact.contributions import concept_contributions, splice
from lib.methods.fact.explain import code_weights, colour_map
from lib.methods.fact.sae_stage import run_sae
from lib.methods.fact.streams import IMAGE, POSITION, VECTORS, VectorStream
from lib.methods.fact.train import TrainState
from lib.models.backbones import load_backbone
from lib.models.layers import extract_layers, split_at
from lib.models.weights import save_backbone
from lib.toy.models.cnn import build_toy, toy_preprocess
from tests.stage_cli import invoke, merge_params

N_CONCEPTS, K, STEPS = 24, 3, 12
SETTINGS = {
    "backbone": {"arch": "toy:bcos", "weights": "models/toy/bcos.pt"},
    "features": {"layers": ["layer2", "layer3"], "batch_size": 16},
    "fact": {
        "batch_size": 8,
        "positions_budget": 1024,  # 1024 // 128 channels = 8 of layer3's 64 positions per image
        # 24 train images x 8 positions = 192 vectors: 6 steps per epoch; 24 latents on 128 channels
        "sae": {"expansion": N_CONCEPTS / 128, "k": K, "aux_k": 6, "epochs": 2, "warmup_epochs": 1 / 3, "decay_epochs": 0.5,
                "dead_epochs": 2.5, "batch_size": 32, "checkpoint_every": 5, "buffer_shards": 2},
        "c2": {"featurizer": "gt", "min_images": 3, "mean_min_images": 2},
        "explain": {"n_images": 2, "top_k": 2, "gallery_concepts": 2, "gallery_images": 2},
    },
}
STAGES = ("clip-images", "features", "sae-data", "sae", "contributions", "fact-explain")


def run(root: Path, *stages: str) -> None:
    for stage in stages:
        result = invoke(root, stage)
        assert result.exit_code == 0, f"{stage}: {result.output}"


@pytest.fixture(scope="module")
def project(toy_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`toy_inputs` (24 train, 8 val, 8 test images) with a random toy B-cos, after every FaCT stage."""
    root = tmp_path_factory.mktemp("fact") / "project"
    shutil.copytree(toy_inputs, root)
    torch.manual_seed(0)
    save_backbone(root / "models/toy/bcos.pt", build_toy("bcos", 8), "toy:bcos", 8, toy_preprocess("bcos", 64))
    merge_params(root, **SETTINGS)
    run(root, *STAGES)
    return root


def _config(root: Path) -> Params:
    return load_params(root / "params.yaml")


def _layout(root: Path) -> Layout:
    return Layout.from_params(_config(root), base=root / "data")


def test_sae_data_holds_the_stored_features_at_the_drawn_positions(project: Path):
    layout = _layout(project)
    store = open_store(layout.fact_vectors)
    vectors, image, position = store[VECTORS][:], store[IMAGE][:], store[POSITION][:]
    train = split_indices(read_manifest(layout.manifest), "train")
    assert vectors.shape == (24 * 8, 128) and vectors.dtype == np.float16
    assert image.tolist() == np.repeat(train, 8).tolist()  # image-major, 8 positions each
    assert all(len(set(position[image == row])) == 8 for row in train)  # drawn without replacement
    feats = open_store(layout.features("layer3"))["features"]
    expected = feats.get_orthogonal_selection((image,))[np.arange(len(image)), :, position // 8, position % 8]
    np.testing.assert_array_equal(vectors, expected)


def test_vector_stream_batches_are_a_function_of_the_step(project: Path):
    vectors = open_store(_layout(project).fact_vectors)[VECTORS]
    stream = VectorStream(vectors, batch_size=32, seed=3, buffer_shards=1)
    straight = list(islice(stream.batches(0), 12))
    resumed = list(islice(stream.batches(5), 7))
    assert all(torch.equal(a, b) for a, b in zip(straight[5:], resumed, strict=True))
    assert not torch.equal(straight[0], straight[1])
    # one epoch (windows of one shard: 128 and 64 vectors -> 4 + 2 batches) draws each kept vector once
    epoch = torch.cat(straight[:6])
    assert len({tuple(row.tolist()) for row in epoch}) == len(epoch)


def test_contributions_are_complete_on_bcos(project: Path):
    """sum_j C_j = y_c - b for the spliced toy B-cos (b = -log(7), its LogitLayer bias), checked
    against the spliced model rebuilt here from the library's split and the SAE's own forward."""
    layout = _layout(project)
    stats = open_store(layout.concept_stats("fact"))
    rows = stats[STATS_IMAGE][:]
    assert rows.tolist() == split_indices(read_manifest(layout.manifest), "test").tolist()
    sae, record = load_sae(layout.fact_sae)
    assert (record["layer"], sae.n_concepts, sae.k) == ("layer3", N_CONCEPTS, K)
    backbone = load_backbone("toy:bcos", project / "models/toy/bcos.pt")
    _, tail = split_at(backbone.model, "layer3")
    acts = torch.from_numpy(read_rows(open_store(layout.features("layer3"))["features"], rows)).float()
    b, c, h, w = acts.shape
    with torch.no_grad():
        x_hat = sae(acts.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h, w, c).permute(0, 3, 1, 2)
        logits = tail(x_hat)
    predicted = logits.argmax(dim=1)
    explained = logits.gather(1, predicted[:, None])[:, 0] + np.log(7)
    total = torch.from_numpy(stats[CONTRIBUTION][:]).double().sum(dim=1)
    torch.testing.assert_close(total, explained.double(), rtol=1e-4, atol=1e-6)
    assert stats[PRED_MODEL][:].tolist() == predicted.tolist()
    stored_logits = read_rows(open_store(layout.logits)["logits"], rows)
    assert stats[PRED_BACKBONE][:].tolist() == stored_logits.argmax(axis=1).tolist()
    assert stats[STATS_LABEL][:].tolist() == read_rows(open_store(layout.images)["labels"], rows).tolist()
    z, _ = splice(sae, acts)
    np.testing.assert_allclose(stats[PRESENCE][:], z.sum(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    assert stats.attrs["method"] == "fact" and len(stats.attrs["concepts"]) == N_CONCEPTS

    metrics = json.loads((project / "metrics/fact.json").read_text())
    assert metrics["dynamic_linear"] is True and metrics["completeness_max_rel_err"] <= 1e-4
    assert metrics["completeness_concept_max_err"] <= 1e-5  # each C_j is its logit through the frozen tail
    with torch.no_grad():  # the explained logit, spliced against unspliced (float32 here: 1 % agreement)
        unspliced = tail(acts).gather(1, predicted[:, None])[:, 0].double() + np.log(7)
    spliced_error = float(((explained.double() - unspliced).abs() / unspliced.abs()).max())
    assert metrics["spliced_logit_max_rel_err"] == pytest.approx(spliced_error, rel=1e-2)
    assert metrics["acc_spliced"] == float((predicted.numpy() == stats[STATS_LABEL][:]).mean())
    assert metrics["fve"] <= 1 and 0 < metrics["l0"] <= K * h * w and 0 <= metrics["alive_pct"] <= 100
    assert 1 <= metrics["poscover80"] <= N_CONCEPTS
    assert metrics["c2_featurizer"] == "gt" and -1 <= metrics["c2_random"] <= 1 and -1 <= metrics["c2"] <= 1
    assert metrics["c2_delta"] == pytest.approx(metrics["c2"] - metrics["c2_random"], abs=2e-6)
    table = pd.read_parquet(layout.fact_c2)  # every concept with 2 of the 8 test images is scored
    assert len(table) == metrics["c2_scored"] >= metrics["c2_concepts"] == int(table["averaged"].sum()) > 0
    assert (table["images"] >= 2).all() and table["extent_fraction"].between(0, 1).all()
    histogram = pd.read_csv(project / "metrics/plots/fact_c2.csv")
    assert histogram["kind"].tolist()[-2:] == ["c2", "c2_random"]
    assert metrics["gt_concepts"] == 17 and 0 <= metrics["gt_found"] <= 17


def test_matching_names_a_latent_for_every_concept(project: Path):
    layout = _layout(project)
    matching = json.loads(layout.fact_matching.read_text())
    names = [c["name"] for c in read_dataset_info(layout.dataset_info)["concepts"]]
    assert [row["concept"] for row in matching["concepts"]] == names
    assert all(0 <= row["latent"] < N_CONCEPTS and -1 <= row["score"] <= 1 for row in matching["concepts"])
    assert [row["latent"] for row in matching["latents"]] == list(range(N_CONCEPTS))


def test_input_maps_sum_to_presence_on_bcos(project: Path, monkeypatch: pytest.MonkeyPatch):
    """B-cos in explanation mode: the input-level map of P_j is its exact share per pixel."""
    monkeypatch.chdir(project)  # backbone.weights is relative to the project
    layout = _layout(project)
    backbone = load_fact_backbone(_config(project), layout, torch.device("cpu"))
    sae, _ = load_sae(layout.fact_sae)
    images = torch.from_numpy(open_store(layout.images)["images"][:4]).repeat_interleave(2, dim=0)
    feats = extract_layers(backbone.model, backbone.preprocess(images), ["layer3"])["layer3"]
    z, _ = splice(sae, feats.detach())
    concepts = z.sum(dim=1).topk(2, dim=1).indices[torch.arange(8), torch.arange(8) % 2]  # each image's two strongest
    presence = z.sum(dim=1).gather(1, concepts[:, None])[:, 0]
    maps = backbone.input_maps(images, sae, concepts)
    assert maps.shape == (8, 64, 64) and (presence > 0).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2)), presence, rtol=1e-4, atol=1e-5)


def test_evaluate_adapter_maps_latents_and_the_class_evidence(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(project)  # backbone.weights is relative to the project
    layout = _layout(project)
    config = _config(project)
    info = read_dataset_info(layout.dataset_info)
    method = METHODS["fact"](EvalContext(config, layout, torch.device("cpu"), GroundTruth.from_info(info)))
    assert method is not None and method.name == "fact"
    rows = split_indices(read_manifest(layout.manifest), "test")[:4]
    store = open_store(layout.images)
    batch = EvalBatch(torch.from_numpy(rows), torch.from_numpy(read_rows(store["images"], rows)),
                      torch.from_numpy(read_rows(store["labels"], rows)))
    maps = method.concept_maps(batch)
    matching = json.loads(layout.fact_matching.read_text())
    assert maps.maps.shape == (4, 17, 8, 8) and maps.concepts.tolist() == list(range(17))
    acts = torch.from_numpy(read_rows(open_store(layout.features("layer3"))["features"], rows)).float()
    z, _ = splice(method.sae, acts)
    latent = matching["concepts"][5]["latent"]
    torch.testing.assert_close(maps.maps[:, 5].reshape(4, -1), z[:, :, latent])
    # with every latent counted as an object, the class map sums to the explained logit sum_j C_j
    method.object_latents = torch.ones(N_CONCEPTS)
    class_maps = method.class_maps(batch)
    stats = open_store(layout.concept_stats("fact"))
    torch.testing.assert_close(class_maps.sum(dim=(1, 2)), torch.from_numpy(stats[CONTRIBUTION][:4]).sum(dim=1), rtol=1e-4, atol=1e-5)
    # contributions: each found concept's latent's C_j (as the stats store has it), NaN where the match is below threshold
    given = method.concept_contributions(batch)
    found = torch.tensor([c["score"] >= config.fact.match_threshold for c in matching["concepts"]])
    assert given.concepts.tolist() == list(range(17)) and 0 < found.sum() < 17
    latents = torch.tensor([c["latent"] for c in matching["concepts"]])
    expected = torch.from_numpy(stats[CONTRIBUTION][:4])[:, latents]
    torch.testing.assert_close(given.values[:, found], expected[:, found], rtol=1e-4, atol=1e-5)
    assert given.values[:, ~found].isnan().all()


def test_fact_explain_writes_explanations_and_a_gallery(project: Path):
    out = _layout(project).fact_explain
    records = json.loads((out / "explanations.json").read_text())
    assert len(records) == 2 and all(len(r["concepts"]) == 2 for r in records)
    local = [f"local_row{r['row']}_latent{r['concepts'][0]['latent']}.png" for r in records]  # each image's top concept
    assert sorted(p.name for p in out.glob("*.png")) == sorted(["gallery.png", *(f"row{r['row']}.png" for r in records), *local])
    stats = open_store(_layout(project).concept_stats("fact"))
    index = {int(row): i for i, row in enumerate(stats[STATS_IMAGE][:])}
    for record in records:  # shares of the positive contributions; the rest is "other concepts", of y - b
        c = stats[CONTRIBUTION][index[record["row"]]].astype(np.float64)
        assert record["explained"] == record["predicted"]
        assert record["positive_total"] == pytest.approx(c.clip(0).sum(), rel=1e-4)
        assert record["explained_logit"] == pytest.approx(c.sum(), rel=1e-4, abs=1e-5)
        for concept in record["concepts"]:
            assert concept["share"] == pytest.approx(c[concept["latent"]] / c.clip(0).sum(), rel=1e-4)
        shown = sum(concept["contribution"] for concept in record["concepts"])
        assert shown + record["other_share"] * record["explained_logit"] == pytest.approx(record["explained_logit"], rel=1e-4, abs=1e-5)


def test_fact_explain_explains_a_chosen_logit_and_named_latents(project: Path, tmp_path: Path):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    first = json.loads((_layout(project).fact_explain / "explanations.json").read_text())
    named = sorted({c["latent"] for r in first for c in r["concepts"]} | {0})
    merge_params(root, fact={"explain": {"logit": 3, "concepts": named, "top_k": N_CONCEPTS}})
    run(root, "fact-explain")
    out = _layout(root).fact_explain
    records = json.loads((out / "explanations.json").read_text())
    classes = read_dataset_info(_layout(root).dataset_info)["classes"]
    assert all(r["explained"] == classes[3] for r in records)
    # every latent is shown (top_k = all), so each named latent gets a local-and-global figure per image
    local = sorted(p.name for p in out.glob("local_*.png"))
    assert local == sorted(f"local_row{r['row']}_latent{j}.png" for r in records for j in named)
    assert all(r["other_share"] == pytest.approx(0, abs=1e-6) for r in records)
    merge_params(root, fact={"explain": {"concepts": [N_CONCEPTS]}})
    result = invoke(root, "fact-explain")
    assert result.exit_code != 0 and "fact.explain.concepts" in result.output


def test_the_logit_and_other_concepts_maps_sum_to_their_contributions(project: Path, monkeypatch: pytest.MonkeyPatch):
    """The input maps of fact_explain: sum_pixels W(x) . [x, 1 - x] of the logit's map is y_c - b, of
    the "other concepts" map sum_(j not shown) C_j, of a shown latent's map its presence."""
    monkeypatch.chdir(project)
    layout = _layout(project)
    backbone = load_fact_backbone(_config(project), layout, torch.device("cpu"))
    sae, _ = load_sae(layout.fact_sae)
    rows = split_indices(read_manifest(layout.manifest), "test")[:2]
    images = torch.from_numpy(read_rows(open_store(layout.images)["images"], rows))
    with torch.no_grad():  # the features the input maps see (the stored ones may tip a near-tie of the top-k)
        acts = extract_layers(backbone.model, backbone.preprocess(images), ["layer3"])["layer3"]
    for b in range(2):
        out = concept_contributions(backbone.tail, sae, acts[b : b + 1])
        shown = out.contributions[0].topk(2).indices.tolist()
        weight = code_weights(out.grad[0], sae.atoms, shown)
        inputs, grads = backbone.input_weights(images[b : b + 1].repeat(4, 1, 1, 1), sae,
                                               lambda codes, weight=weight: (codes * weight).sum(dim=(1, 2)))
        sums = (inputs * grads).sum(dim=(1, 2, 3)).double()
        explained = out.explained[0].item()
        expected = [*out.presence[0, shown].tolist(), explained, explained - out.contributions[0, shown].sum().item()]
        torch.testing.assert_close(sums, torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-5)
        image = colour_map(inputs[2], grads[2], 3, 99.5)
        assert image.shape == (64, 64, 4) and 0 <= image.min() and image.max() <= 1
        np.testing.assert_allclose(image, gradient_to_image(inputs[2].double(), grads[2].double(), smooth=3, alpha_percentile=99.5))


def test_clip_images_stores_the_dense_feature_map(project: Path):
    store = open_store(_layout(project).clip_images)
    assert store[DENSE].shape == (40, 512, 2, 2) and store.attrs["dense_layer"] == "layer4"  # toy CLIP: ModifiedResNet at 64 px


def test_sae_resumes_after_a_kill_and_ends_where_an_uninterrupted_run_ends(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    monkeypatch.chdir(root)
    config, layout = load_params("params.yaml"), Layout.from_params(load_params("params.yaml"))
    reference, _ = load_sae(layout.fact_sae)
    layout.fact_sae.unlink()
    save = TrainState.save_checkpoint

    def killed_after_first_checkpoint(state: TrainState, path: Path) -> None:
        save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainState, "save_checkpoint", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_sae(config, layout, torch.device("cpu"), Ranks())
    assert not layout.fact_sae.exists() and len(list((layout.root / ".partial").rglob("sae_checkpoint-*.pt"))) == 1
    monkeypatch.setattr(TrainState, "save_checkpoint", save)
    report = run_sae(config, layout, torch.device("cpu"), Ranks())
    assert report.resumed_from == 5 and report.steps == STEPS
    resumed, _ = load_sae(layout.fact_sae)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    log = (root / "metrics/plots/fact_sae.csv").read_text().splitlines()
    assert log[0] == "step,loss,mse,aux,dead_fraction,lr,val_acc,val_loss" and [int(r.split(",")[0]) for r in log[1:]] == list(range(STEPS))
    assert not list((layout.root / ".partial").rglob("sae_checkpoint-*"))


def test_sae_keeps_the_best_spliced_val_accuracy_then_the_lowest_val_loss(project: Path):
    """Val is scored after each epoch (steps 6 and 12: rows 5 and 11 of the curve); the published
    model is the state of the evaluation with the best accuracy, ties to the lower loss, and its
    figures in metrics/fact_sae.json are recomputed here from the published weights."""
    layout = _layout(project)
    curve = pd.read_csv(project / "metrics/plots/fact_sae.csv")
    scored = curve.dropna(subset=["val_acc"])
    assert scored["step"].tolist() == [5, 11]
    best = scored.sort_values(["val_acc", "val_loss", "step"], ascending=[False, True, True]).iloc[0]
    metrics = json.loads((project / "metrics/fact_sae.json").read_text())
    assert metrics["kept_step"] == int(best["step"]) + 1
    assert metrics["val_acc_spliced"] == pytest.approx(best["val_acc"]) and metrics["val_loss"] == pytest.approx(best["val_loss"], rel=1e-4)
    assert (metrics["n_latents"], metrics["k"], metrics["aux_k"], metrics["steps"]) == (N_CONCEPTS, K, 6, STEPS)

    sae, _ = load_sae(layout.fact_sae)
    config = _config(project)
    manifest = read_manifest(layout.manifest)
    _, val, _ = train_val_indices(manifest, config.fact.val_fraction, config.fact.seed)
    acts = torch.from_numpy(read_rows(open_store(layout.features("layer3"))["features"], val)).float()
    x = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])
    with torch.no_grad():
        err = (x - sae(x)).norm(dim=1)
        loss = (err / sae.scale).square().mean()
        std, mean = torch.std_mean(err)
    assert metrics["val_loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert metrics["l2_error_mean"] == pytest.approx(mean.item(), rel=1e-4)
    assert metrics["l2_error_std"] == pytest.approx(std.item(), rel=1e-4)


def _fact_state_dict(sae) -> dict[str, torch.Tensor]:
    """`sae`'s weights in FaCT's released layout (MyBiasFreeTopKSAE.state_dict(): dictionary_learning's
    AutoEncoderTopK buffers k and threshold, bias-free encoder and decoder; b_dec is no longer a
    parameter there) plus the training log FaCT saves beside them."""
    return {
        "k": torch.tensor(sae.k, dtype=torch.int), "threshold": torch.tensor(-1.0),
        "decoder.weight": sae.decoder.weight.detach().clone(), "encoder.weight": sae.encoder.weight.detach().clone(),
        "log": {"val_acc": torch.tensor(1.0), "l2_loss": 0.1},
    }


def test_sae_publishes_a_released_fact_checkpoint_instead_of_training(project: Path, tmp_path: Path):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    layout = Layout.from_params(_config(root), base=root / "data")
    trained, _ = load_sae(layout.fact_sae)
    torch.save(_fact_state_dict(trained), root / "released.pt")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["fact"]["sae"] = {**raw["fact"]["sae"], "checkpoint": "released.pt", "k": 1}  # the file's own k wins
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    run(root, "sae")
    published, record = load_sae(layout.fact_sae)
    assert record["released"] == "released.pt" and published.k == K and published.n_concepts == N_CONCEPTS
    for name in ("encoder.weight", "decoder.weight"):
        assert torch.equal(published.state_dict()[name], trained.state_dict()[name])
    x = torch.randn(50, 128)
    torch.testing.assert_close(published(x), trained(x), rtol=1e-5, atol=1e-5)  # the scale cancels
    assert json.loads((root / "metrics/fact_sae.json").read_text())["released"] == "released.pt"

    wrong = _fact_state_dict(trained)
    wrong["encoder.weight"], wrong["decoder.weight"] = wrong["encoder.weight"][:, :64], wrong["decoder.weight"][:64]
    torch.save(wrong, root / "released.pt")
    result = invoke(root, "sae")
    assert result.exit_code != 0 and "fact.sae.checkpoint" in result.output and "128 channels" in result.output
    biased = {**_fact_state_dict(trained), "encoder.bias": torch.zeros(N_CONCEPTS)}
    torch.save(biased, root / "released.pt")
    result = invoke(root, "sae")
    assert result.exit_code != 0 and "bias" in result.output


def test_toy_cnn_reports_its_completeness_error(project: Path, tmp_path: Path):
    """On the toy CNN at layer2 the tail (a ReLU block with BatchNorm shifts) is not dynamic linear:
    the stage reports the completeness error instead of failing; without dense CLIP features no C²."""
    root = tmp_path / "project"
    shutil.copytree(project, root)
    torch.manual_seed(1)
    cnn = build_toy("cnn", 8)
    with torch.no_grad():  # as after training: a fresh BatchNorm is x / sqrt(1 + eps), and a bias-free ReLU net is homogeneous
        for norm in (m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.bias.normal_()
            norm.running_mean.normal_()
    save_backbone(root / "models/toy/cnn.pt", cnn, "toy:cnn", 8, toy_preprocess("cnn", 64))
    merge_params(root, backbone={"arch": "toy:cnn", "weights": "models/toy/cnn.pt"}, clip_images={"dense": False})
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["fact"]["layer"] = "layer2"
    raw["fact"]["positions_budget"] = 512  # 8 of layer2's 256 positions (64 channels)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    run(root, "clip-images", "features", "sae-data", "sae", "contributions")
    metrics = json.loads((root / "metrics/fact.json").read_text())
    assert metrics["dynamic_linear"] is False and metrics["completeness_max_rel_err"] > 1e-3
    assert metrics["completeness_concept_max_err"] <= 1e-5  # piecewise affine: frozen ReLU gates give the same C_j
    assert metrics["c2_featurizer"] == "gt"  # the ground-truth masks need no dense CLIP features


def test_with_a_new_head_fact_explains_the_backbones_top_output(project: Path, tmp_path: Path):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    merge_params(root, backbone={"new_head": True})
    run(root, "features", "sae-data", "sae", "contributions", "fact-explain")
    metrics = json.loads((root / "metrics/fact.json").read_text())
    assert metrics["acc_backbone"] is None and metrics["acc_spliced"] is None and metrics["completeness_max_rel_err"] <= 1e-4
    stats = open_store(_layout(root).concept_stats("fact"))
    assert set(stats[PRED_MODEL][:].tolist()) == set(stats[PRED_BACKBONE][:].tolist()) == {-1}


def test_fact_layer_must_be_extracted():
    with pytest.raises(ValueError, match="fact.layer 'layer1' is not extracted"):
        Params.model_validate({"features": {"layers": ["layer3"]}, "fact": {"layer": "layer1"}})
