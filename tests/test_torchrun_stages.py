"""The per-image stages under torchrun: 2 CPU ranks (gloo) write the one-process stores byte for byte.

circles and clip_images have theirs in test_circles_stage.py, CE-FAM's regions in test_cefam_stages.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lib.core.cli import progress
from lib.core.distributed import Ranks
from lib.core.layout import Layout
from lib.core.params import load_params
from lib.methods.fact.contributions_stage import run_contributions
from lib.methods.fact.sae_stage import run_sae
from lib.methods.fact.vectors import run_sae_data
from lib.pipeline.features import run_features

REPO = Path(__file__).resolve().parents[1]
SAE = {"expansion": 0.25, "k": 4, "aux_k": 8, "epochs": 1, "warmup_epochs": 0.25, "decay_epochs": 0.25, "batch_size": 64,
       "checkpoint_every": 4}


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(circled_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`circled_inputs` (40 toy images, clip_images written) with the shipped toy CNN as the backbone, a
    toy-sized SAE and shards of 8 images (the 8 test images of contributions in 2 shards: one per rank)."""
    root = tmp_path_factory.mktemp("torchrun") / "project"
    shutil.copytree(circled_inputs, root)
    shutil.copy(REPO / "models/toy/cnn.pt", root / "models/toy/cnn.pt")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["data"]["rows_per_shard"] = 4
    raw["fact"] = {"sae": SAE, "c2": {"featurizer": "gt"}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


# command, its entry point, what it writes, the entry points that run first (in one process)
CASES = {
    "features": (run_features, ("features/layer3.zarr", "features/logits.zarr"), ()),
    "sae-data": (run_sae_data, ("fact/sae_data.zarr",), (run_features,)),
    "contributions": (run_contributions, ("fact/concept_stats.zarr",), (run_features, run_sae_data, run_sae)),
}


@pytest.mark.parametrize("command", list(CASES))
def test_two_ranks_write_the_one_process_stores(project, enter_copy, torchrun, command):
    entry, outputs, before = CASES[command]
    root = enter_copy(project)
    config = load_params("params.yaml")
    layout = Layout.from_params(config)
    with progress() as bar:
        for stage in (*before, entry):
            stage(config, layout, torch.device("cpu"), Ranks(), bar)
    paths = [layout.root / output for output in outputs]
    one_process = [files(path) for path in paths]
    metrics = layout.fact_metrics.read_text() if command == "contributions" else None
    for path in paths:
        shutil.rmtree(path)
    result = torchrun("-m", "stages", command, "--params", "params.yaml", cwd=root)
    assert result.stderr.count(f"{command}:") == 2  # both ranks report
    assert [files(path) for path in paths] == one_process
    if metrics is not None:  # rank 0 gathered every rank's images: the metrics of one process (C² aside: ties may differ)
        ours, theirs = json.loads(layout.fact_metrics.read_text()), json.loads(metrics)
        assert {k: v for k, v in ours.items() if not k.startswith("c2")} == {k: v for k, v in theirs.items() if not k.startswith("c2")}
