"""Progress callbacks for training loops, drawn on a rich progress bar (display only)."""

from __future__ import annotations

from rich.progress import Progress


def progress_callback(progress: Progress | None, description: str, total: int, key: str):
    """A train/fit progress callback that moves a rich bar and shows the latest `key` metric."""
    if progress is None:
        return None
    task = progress.add_task(description, total=total)

    def update(step: int, metrics: dict[str, float]) -> None:
        progress.update(task, completed=step, description=f"{description} ({key} {metrics[key]:.4f})")

    return update
