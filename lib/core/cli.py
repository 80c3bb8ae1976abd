"""What every stage command shares: the --params option, error reporting, progress, set-up, `run_stage`.

The Typer app itself is built in `stages/__main__.py` from one explicit table of commands.
Store-writing stages run under torchrun through `lib.core.sharded_stage.run_sharded_stage`, kept
apart so that stages which write no stores (the toy models' training) do not depend on the store code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lib.core.errors import UserError
from lib.core.params import DEFAULT_PARAMS

if TYPE_CHECKING:  # torch and the stage modules load only when a command runs
    import torch

    from lib.core.layout import Layout
    from lib.core.params import Params

console = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="Params file to read.")]
DEFAULT_PARAMS_PATH = DEFAULT_PARAMS

@contextmanager
def user_errors() -> Iterator[None]:
    """Show a UserError as one red message and exit with status 2; anything else keeps its traceback."""
    try:
        yield
    except UserError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
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
    """The one-line summary a stage prints when it finishes (one line in logs too: not wrapped)."""
    console.print(f"[bold green]{stage}[/bold green]: {text}", highlight=False, soft_wrap=True)


Check = Callable[["Params"], None]


def stage_setup(name: str, params: Path, check: Check | None = None) -> tuple[Params, Layout, torch.device]:
    """What stage `name` (its command's name) starts with: validated params, its layout and its device (runtime.device).

    Right after the schema, before anything is loaded: the outputs of other stages it reads must
    exist (`lib.core.upstream`, from dvc.yaml's deps), then `check(config)`, the stage's checks that
    need no data or weights (a UserError naming the key when one fails). The store readers of this
    process get runtime.num_workers threads (`lib.core.streams.read_ahead`).
    """
    from lib.core.device import resolve_device, set_reader_threads
    from lib.core.layout import Layout
    from lib.core.params import load_params
    from lib.core.upstream import check_upstream, dvc_stage_name

    config = load_params(params)
    check_upstream(dvc_stage_name(name), config)
    if check is not None:
        check(config)
    set_reader_threads(config.runtime.num_workers)
    return config, Layout.from_params(config), resolve_device(config.runtime.device)


class StageReport(Protocol):
    """What a stage's lib entry point returns: `summary()` is the line the command prints."""

    def summary(self) -> str: ...


def run_stage(
    name: str, params: Path, entry: Callable[..., StageReport], *, check: Check | None = None, **options: Any
) -> StageReport:
    """The body of every pipeline command: set up, call the stage's one lib entry point, print its summary.

    `entry(config, layout, device, progress, **options)`. `check(config)` is the validation step: it
    runs right after the params load, before any model or data, and checks what the stage reads
    (see `stage_setup`). A UserError is one line and exit status 2.
    """
    return run_with_setup(name, lambda: stage_setup(name, params, check), entry, **options)


def run_with_setup(name: str, setup: Callable[[], tuple], entry: Callable[..., StageReport], **options: Any) -> StageReport:
    """Call `entry(*setup(), progress, **options)` under one progress display and print its summary."""
    with user_errors():
        arguments = setup()
        with progress() as bar:
            report = entry(*arguments, bar, **options)
    details = getattr(report, "details", None)
    if details:
        from rich.markdown import Markdown

        console.print(Markdown(details()))
    summary(name, report.summary())
    return report
