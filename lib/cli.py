"""What every stage command shares: the Typer app, the --params option, error reporting, progress."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lib.params import DEFAULT_PARAMS, ParamsError
from lib.stores import IncompleteStoreError

if TYPE_CHECKING:  # torch and the stage modules load only when a command runs
    import torch

    from lib.distributed import Ranks
    from lib.layout import Layout
    from lib.params import Params

app = typer.Typer(
    help="conceptrace pipeline stages. Each command reads its section of params.yaml; `dvc repro` runs them in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="Params file to read.")]
DEFAULT_PARAMS_PATH = DEFAULT_PARAMS

# Errors a user can fix by changing params or inputs: shown as one clear message, no traceback.
USER_ERRORS = (ParamsError, IncompleteStoreError, ValueError, FileNotFoundError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user-fixable error into a one-line red message and exit status 2."""
    try:
        yield
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def progress() -> Progress:
    """The progress bar every long loop uses (to stderr, so stdout stays parseable)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def summary(stage: str, text: str) -> None:
    """The one-line summary a stage prints when it finishes."""
    console.print(f"[bold green]{stage}[/bold green]: {text}", highlight=False)


@app.callback()
def main() -> None:
    """conceptrace pipeline stages (see README.md; `dvc repro` runs them in order)."""


def stage_setup(params: Path) -> tuple[Params, Layout, torch.device]:
    """What a stage starts with: validated params, its layout and its device (runtime.device)."""
    from lib.device import resolve_device
    from lib.layout import Layout
    from lib.params import load_params

    config = load_params(params)
    return config, Layout.from_params(config), resolve_device(config.runtime.device)


def sharded_stage(params: Path) -> tuple[Params, Layout, torch.device, Ranks]:
    """stage_setup for a store-writing stage: under torchrun, this rank's ranks and device
    (one GPU per rank)."""
    from lib.distributed import init_ranks

    config, layout, device = stage_setup(params)
    ranks, device = init_ranks(device)
    return config, layout, device, ranks
