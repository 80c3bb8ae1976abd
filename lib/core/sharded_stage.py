"""The command body of the store-writing stages: `run_stage` under torchrun (one GPU per rank)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib.core.cli import Check, StageReport, run_with_setup, stage_setup
from lib.core.distributed import init_ranks


def run_sharded_stage(
    name: str, params: Path, entry: Callable[..., StageReport], *, check: Check | None = None, **options: Any
) -> StageReport:
    """`run_stage` for a stage that writes stores: `entry(config, layout, device, ranks, progress, **options)`,
    with this torchrun rank's ranks and device (one process without torchrun)."""

    def setup() -> tuple:
        config, layout, device = stage_setup(name, params, check)
        ranks, device = init_ranks(device)
        return config, layout, device, ranks

    return run_with_setup(name, setup, entry, **options)
