"""The stats stage's entry point: reduce every concept method's concept_stats store, write the results."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from dask.callbacks import Callback
from rich.progress import Progress

from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.outputs import write_csv, write_json, write_parquet
from lib.core.params import Params
from lib.data.manifest import read_dataset_info
from lib.stats.reduce import ConceptStatistics, concept_statistics, open_concept_stats

__all__ = ["METHODS", "StatsReport", "dask_scheduler", "run_stats"]

# Every concept method that writes a concept_stats store (Layout.concept_stats), in report order.
METHODS = ("salf", "fact", "cefam")
TABLES = ("concepts", "per_class", "top_images")  # ConceptStatistics fields written as data/<name>/stats/<table>.parquet
CONNECT_TIMEOUT = "20s"  # how long to try reaching a dask.distributed scheduler


@contextmanager
def dask_scheduler(address: str) -> Iterator[Any]:
    """dask.compute's `scheduler`: "threads" (this machine), or a Client of the dask.distributed
    scheduler at `address` (tcp://host:port), whose workers must see the stores' paths."""
    if address == "threads":
        yield "threads"
        return
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise UserError(
            f"no dask scheduler answers: {exc}", key="stats.scheduler", value=address,
            fix="start one (`dask scheduler`, then `dask worker <address>`) or set stats.scheduler: threads",
        ) from exc
    with client:
        yield client


class _TaskBar(Callback):
    """Advances a progress bar per finished dask task (local schedulers; a cluster has its dashboard)."""

    def __init__(self, progress: Progress, description: str) -> None:
        super().__init__()
        self.progress, self.task = progress, progress.add_task(description, total=None)

    def _start_state(self, dsk: dict, state: dict) -> None:
        self.progress.update(self.task, total=len(dsk))

    def _posttask(self, key: Any, result: Any, dsk: dict, state: dict, worker_id: Any) -> None:
        self.progress.advance(self.task)


@dataclass(frozen=True)
class StatsReport:
    stats: dict[str, ConceptStatistics]
    skipped: list[str]
    metrics_path: Path

    def summary(self) -> str:
        parts = []
        for name, stats in self.stats.items():
            m = stats.metrics
            backbone = "" if m["acc_backbone"] is None else f" (backbone {m['acc_backbone']:.3f})"
            cover = "-" if m["poscover80"] is None else f"{m['poscover80']:.1f}"
            parts.append(
                f"{name}: {m['n_images']} images, acc {m['acc_model']:.3f}{backbone}, L0 {m['l0']:.1f}, PosCover-80 {cover}, "
                f"alive {m['alive_pct']:.0f}%, always on {m['always_on']}"
            )
        skipped = f"; skipped (no concept_stats store yet): {', '.join(self.skipped)}" if self.skipped else ""
        return f"{'; '.join(parts) or 'no method has a concept_stats store'} -> {self.metrics_path}{skipped}"


def run_stats(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> StatsReport:
    """Reduce the concept_stats store of every method in METHODS that has one (on the CPU: `device` is
    unused); write metrics/stats.json (per method), data/<name>/stats/{concepts,per_class,top_images}.parquet
    and the coverage curves metrics/plots/stats_coverage.csv."""
    classes = read_dataset_info(layout.dataset_info)["classes"]
    available = [m for m in METHODS if layout.concept_stats(m).exists()]
    stats = {}
    with dask_scheduler(config.stats.scheduler) as scheduler:
        for method in available:
            group = open_concept_stats(layout.concept_stats(method))
            local = progress is not None and isinstance(scheduler, str)
            with _TaskBar(progress, f"stats {method}") if local else nullcontext():
                stats[method] = concept_statistics(group, classes, config.stats.top_images, scheduler)
    for table in TABLES:
        frames = [getattr(s, table).assign(method=method) for method, s in stats.items()]
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"method": []})
        write_parquet(layout.stats / f"{table}.parquet", frame[["method", *frame.columns.drop("method")]])
    curves = [s.coverage.assign(method=method) for method, s in stats.items()]
    curve = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame({"method": [], "rank": [], "mean_pct": [], "std_pct": []})
    write_csv(layout.stats_plot("coverage"), curve[["method", "rank", "mean_pct", "std_pct"]])
    write_json(layout.stats_metrics, {method: s.metrics for method, s in stats.items()})
    return StatsReport(stats, [m for m in METHODS if m not in available], layout.stats_metrics)
