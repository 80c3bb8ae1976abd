"""The stats stage: hand-computed statistics of a tiny store, the same numbers on a dask.distributed
LocalCluster as on local threads, and reductions that never hold a whole (images x concepts) array."""

import json
import os
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import yaml
from dask.callbacks import Callback
from dask.sizeof import sizeof
from typer.testing import CliRunner

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.params import ParamsError, load_params
from lib.core.schema import CONTRIBUTION, PRED_BACKBONE, PRED_MODEL, PRESENCE, STATS_IMAGE, STATS_LABEL, concept_stats_specs
from lib.core.stores import ShardedWriter
from lib.metrics.concepts import poscover
from lib.stats.reduce import concept_statistics, open_concept_stats
from lib.stats.stage import dask_scheduler
from stages.__main__ import app

CLASSES = ["a", "b", "c"]
CONCEPTS = ["c0", "c1", "dead", "neg"]
# Six images, four concepts, shards of four rows (the second one partial). Expected values by hand.
TINY = {
    STATS_IMAGE: [10, 20, 30, 40, 50, 60],
    STATS_LABEL: [0, 0, 1, 1, 2, 2],
    PRED_BACKBONE: [0, 0, 1, 2, 2, 2],  # 5 of 6 right
    PRED_MODEL: [0, 1, 1, 1, 2, 0],  # 4 of 6 right; agrees with the backbone on 3
    CONTRIBUTION: [
        [2, 1, 0, 0],  # L0 2; positive 3, 80% = 2.4 -> 2 + 1: 2 concepts
        [5, 0, 0, -1],  # L0 2; 5 alone covers 80% of 5: 1
        [1, 1, 0, 1],  # L0 3; 80% of 3 needs all three: 3
        [0, 0, 0, -2],  # L0 1; nothing positive: left out of PosCover
        [0, 3, 0, 0],  # L0 1; 1
        [0, 0, 0, 0],  # L0 0; nothing positive
    ],
    PRESENCE: [
        [1, 0.5, 2, -0.5],
        [2, 0, 1.5, -1],
        [3, 1, 1, -0.1],
        [4, 0, 0.5, -2],
        [5, 2, 0.25, -3],
        [6, 0, -1, -0.2],
    ],  # present (> 0): c0 6/6 (always on, > 85%), c1 3/6, dead 5/6 (not > 85%), neg 0/6
}


def write_concept_stats(path: Path, arrays: dict, rows_per_shard: int, concepts: list[str]) -> None:
    n, j = np.shape(arrays[CONTRIBUTION])
    attributes = {"method": "test", "split": "test", "concepts": concepts}
    writer = ShardedWriter(path, concept_stats_specs(n, j), rows_per_shard, attributes, fingerprint="test")
    for shard in writer.pending():
        writer.write(shard, {name: np.asarray(value)[writer.rows(shard)] for name, value in arrays.items()})
    writer.finalize()


def random_arrays(n: int, j: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A FaCT-like store: sparse nonnegative presence, contributions of either sign on the present concepts."""
    rng = np.random.default_rng(seed)
    presence = rng.exponential(size=(n, j)) * (rng.random((n, j)) < 0.2)
    return {
        STATS_IMAGE: np.arange(n) * 3,
        STATS_LABEL: rng.integers(0, k, n),
        PRED_BACKBONE: rng.integers(0, k, n),
        PRED_MODEL: rng.integers(0, k, n),
        PRESENCE: presence,
        CONTRIBUTION: presence * rng.normal(0.3, 1, (n, j)),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "concept_stats.zarr"
    write_concept_stats(path, TINY, 4, CONCEPTS)
    return concept_statistics(open_concept_stats(path), CLASSES, top_k=2)


def test_poscover_counts_concepts_for_80_percent_of_the_positive_part():
    rows = np.array(TINY[CONTRIBUTION], dtype=np.float32)
    np.testing.assert_array_equal(poscover(rows), [2, 1, 3, np.nan, 1, np.nan])
    assert poscover(np.array([[1.0, 1.0, 1.0]]), fraction=1.0)[0] == 3  # round-off never asks for a 4th


def test_metrics_by_hand(tiny):
    assert tiny.metrics == pytest.approx({
        "n_images": 6,
        "n_concepts": 4,
        "acc_backbone": 5 / 6,
        "acc_model": 4 / 6,
        "agreement": 3 / 6,
        "l0": (2 + 2 + 3 + 1 + 1 + 0) / 6,
        "alive_pct": 75.0,  # "dead" never contributes
        "always_on": 1,
        # c0's share of each covered image's positive contribution: 2/3, 1, 1/3, 0 (rows 0, 1, 2, 4)
        "always_on_share_pct": 100 * (2 / 3 + 1 + 1 / 3 + 0) / 4,
        "poscover80": (2 + 1 + 3 + 1) / 4,
        "no_positive_pct": 100 * 2 / 6,
    })


def test_coverage_curve_by_hand(tiny):
    """FaCT's coverage curve over the four images with a positive contribution. Sorted positive
    shares, cumulated: row 0 (2/3, 1, 1, 1), row 1 (1, 1, 1, 1), row 2 (1/3, 2/3, 1, 1), row 4 (1, 1, 1, 1)."""
    curves = np.array([[2 / 3, 1, 1, 1], [1, 1, 1, 1], [1 / 3, 2 / 3, 1, 1], [1, 1, 1, 1]]) * 100
    assert tiny.coverage["rank"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(tiny.coverage["mean_pct"], [75, 100 * 11 / 12, 100, 100])
    np.testing.assert_allclose(tiny.coverage["std_pct"], curves.std(axis=0, ddof=1), atol=1e-9)


def test_per_concept_table(tiny):
    table = tiny.concepts.set_index("concept")
    assert table.loc[["c0", "c1", "dead", "neg"], "present_rate"].tolist() == pytest.approx([1, 0.5, 5 / 6, 0])
    assert table["always_on"].tolist() == [True, False, False, False]
    assert table["alive"].tolist() == [True, True, False, True]
    assert table.loc["neg", "mean_contribution"] == pytest.approx((-1 + 1 - 2) / 6)


def test_per_class_mean_contributions_over_images_predicted_as_the_class(tiny):
    # class a: images 10, 60; class b: 20, 30, 40; class c: 50. Zero means are left out.
    rows = tiny.per_class.to_dict("records")
    assert {(r["class"], r["concept"]): r["mean_contribution"] for r in rows} == pytest.approx({
        ("a", "c0"): 1.0, ("a", "c1"): 0.5,
        ("b", "c0"): 2.0, ("b", "c1"): 1 / 3, ("b", "neg"): -2 / 3,
        ("c", "c1"): 3.0,
    })
    assert {r["class"]: r["n_images"] for r in rows} == {"a": 2, "b": 3, "c": 1}


def test_top_images_by_presence(tiny):
    top = tiny.top_images
    assert top["rank"].tolist() == [0, 1] * 4
    assert top["image"].tolist() == [60, 50, 50, 30, 10, 20, 30, 60]
    assert top["presence"].tolist() == pytest.approx([6, 5, 2, 1, 2, 1.5, -0.1, -0.2])
    assert top["label"].tolist() == [2, 2, 2, 1, 0, 0, 1, 2] and top["pred_model"].tolist() == [0, 2, 2, 1, 0, 1, 1, 0]
    assert top["concept"].tolist() == ["c0", "c0", "c1", "c1", "dead", "dead", "neg", "neg"]


def test_no_backbone_prediction_gives_no_backbone_accuracy(tmp_path):
    """backbone.new_head: the backbone predicts no dataset class (-1), so there is no acc_backbone."""
    path = tmp_path / "concept_stats.zarr"
    write_concept_stats(path, {**TINY, PRED_BACKBONE: [-1] * 6}, 4, CONCEPTS)
    metrics = concept_statistics(open_concept_stats(path), CLASSES, top_k=2).metrics
    assert metrics["acc_backbone"] is None and metrics["agreement"] is None and metrics["acc_model"] == pytest.approx(4 / 6)


def test_distributed_local_cluster_gives_the_threaded_numbers(tmp_path):
    from distributed import LocalCluster

    path = tmp_path / "concept_stats.zarr"
    write_concept_stats(path, random_arrays(300, 24, 5), 64, [f"z{i}" for i in range(24)])
    group = open_concept_stats(path)
    threaded = concept_statistics(group, CLASSES + ["d", "e"], top_k=7)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with dask_scheduler(cluster.scheduler_address) as client:
            distributed = concept_statistics(group, CLASSES + ["d", "e"], top_k=7, scheduler=client)
    assert distributed.metrics == pytest.approx(threaded.metrics, rel=1e-12)
    for table in ("concepts", "per_class", "top_images"):
        pd.testing.assert_frame_equal(getattr(distributed, table), getattr(threaded, table), rtol=1e-12)
    assert threaded.metrics["always_on"] == 0 and 0 < threaded.metrics["poscover80"] < threaded.metrics["l0"]


def test_memory_holds_a_few_shards_whatever_their_number(tmp_path):
    """At no point does the scheduler hold more than a few shards' data (loaded blocks and sums
    together), though the store has 32: each shard is reduced to its sums as soon as it is read."""
    n, j, rows = 2048, 64, 64
    path = tmp_path / "concept_stats.zarr"
    write_concept_stats(path, random_arrays(n, j, 5), rows, [f"z{i}" for i in range(j)])
    held = []

    class Held(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            held.append(sum(sizeof(value) for value in state["cache"].values()))

    with Held(), dask.config.set(num_workers=2):
        concept_statistics(open_concept_stats(path), CLASSES + ["d", "e"], top_k=10)
    shard = rows * j * 4 * 2  # presence and contributions of one shard
    assert len(held) > n // rows and max(held) <= 4 * shard


def test_broken_store_and_bad_scheduler_are_user_errors(tmp_path, monkeypatch):
    path = tmp_path / "concept_stats.zarr"
    write_concept_stats(path, TINY, 4, CONCEPTS[:3])
    with pytest.raises(UserError, match="3 concept names do not fit"):
        open_concept_stats(path)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"stats": {"scheduler": "localhost:8786"}}))
    with pytest.raises(ParamsError, match="stats.scheduler"):
        load_params(bad)
    monkeypatch.setattr("lib.stats.stage.CONNECT_TIMEOUT", "1s")
    with pytest.raises(UserError, match="no dask scheduler answers"), dask_scheduler("tcp://127.0.0.1:9"):
        pass


def test_stage_writes_metrics_and_tables_and_lists_missing_methods(tmp_path):
    layout = Layout(tmp_path / "data" / "toy", tmp_path / "metrics")
    layout.root.mkdir(parents=True)
    layout.dataset_info.write_text(json.dumps({"classes": CLASSES}))
    write_concept_stats(layout.concept_stats("salf"), TINY, 4, CONCEPTS)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"runtime": {"device": "cpu"}, "stats": {"top_images": 2}}))
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        result = CliRunner().invoke(app, ["stats", "--params", "params.yaml"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert "skipped (no concept_stats store yet): fact, cefam" in " ".join(result.output.split())
    metrics = json.loads(layout.stats_metrics.read_text())
    assert list(metrics) == ["salf"] and metrics["salf"]["poscover80"] == pytest.approx(1.75)
    per_class = pd.read_parquet(layout.stats / "per_class.parquet")
    assert len(per_class) == 6 and set(per_class["method"]) == {"salf"}
    assert len(pd.read_parquet(layout.stats / "top_images.parquet")) == 8
    assert len(pd.read_parquet(layout.stats / "concepts.parquet")) == 4
    curve = pd.read_csv(layout.stats_plot("coverage"))
    assert curve.columns.tolist() == ["method", "rank", "mean_pct", "std_pct"] and curve["method"].tolist() == ["salf"] * 4
    assert curve["mean_pct"].tolist() == pytest.approx([75, 100 * 11 / 12, 100, 100])
