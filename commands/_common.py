"""What every command shares: the console, error reporting and option aliases."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from freetumor_cli.core.errors import EXIT_INTERRUPTED, FreetumorError

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

P = ParamSpec("P")
R = TypeVar("R")


def one_of(names: Iterable[str]) -> Any:
    """An option type that accepts one of ``names`` (Typer lists them as the choices)."""
    return Literal[tuple(names)]  # type: ignore[valid-type]


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="YAML file with configuration values (overridden by --set and flags).", show_default=False
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override one configuration value, e.g. --set rules.abdomen_hu_change=[60,120]. Repeatable.",
        show_default=False,
    ),
]
MaxStepsOption = Annotated[
    int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps.", show_default=False)
]
MixedPrecisionOption = Annotated[
    str | None, typer.Option("--mixed-precision", help="no | fp16 | bf16.", show_default="no")
]
WorkersOption = Annotated[int | None, typer.Option("--workers", help="Data loader processes.", show_default="2")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")]
SeedOption = Annotated[
    int | None, typer.Option("--seed", help="Random seed: the same seed gives the same output.", show_default="0")
]


def progress_bar(label: str | None = None) -> Any:
    """A transient progress bar on stderr: label (or the task's description), bar, done/total, elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns: list[Any] = [
        TextColumn(f"[bold]{label}" if label else "[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    columns.append(TimeElapsedColumn())
    return Progress(*columns, console=err_console, transient=True)


def report_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`FreetumorError` into a one-line message and its exit code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except FreetumorError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished outputs are kept, none is half-written")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


class _LogToConsole(logging.Handler):
    """The library's ``freetumor`` log lines, printed above the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[dim]{escape(record.getMessage())}[/]", soft_wrap=True)


def show_library_log() -> None:
    """Print the library's INFO lines (which data path a run uses, its step counts) on the console."""
    logger = logging.getLogger("freetumor")
    if not any(isinstance(h, _LogToConsole) for h in logger.handlers):
        logger.addHandler(_LogToConsole())
    logger.setLevel(logging.INFO)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)
