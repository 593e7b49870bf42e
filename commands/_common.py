"""What every command shares: the console, error reporting and option aliases."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

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


def set_option(example: str) -> Any:
    """The ``--set KEY=VALUE`` option, its help showing ``example`` (a value the command accepts: tested)."""
    return Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help=f"Override one configuration value, e.g. --set {example}. Repeatable.",
            show_default=False,
        ),
    ]


SET_EXAMPLES = {
    "synthesize": "rules.abdomen_hu_change=[60,120]",
    "train-seg": "crops_per_volume=2",
    "train-synth": "volumes_per_batch=2",
    "prepare": "preprocessing.abdomen_spacing_mm=[1.5,1.5,2.0]",
    "evaluate": "tolerance_mm=1.0",
}


MaxStepsOption = Annotated[
    int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps.", show_default=False)
]
NumPartsOption = Annotated[
    int, typer.Option("--num-parts", help="Split the work into this many parts (a cluster's array jobs).", min=1)
]
PartIdOption = Annotated[int, typer.Option("--part-id", help="The part this job does, 0 .. num-parts - 1.", min=0)]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")]


def mixed_precision_option(default: str) -> Any:
    """``--mixed-precision``, showing the stage config's ``default``."""
    return Annotated[
        Literal["no", "fp16", "bf16"] | None,
        typer.Option(
            "--mixed-precision", help="Mixed precision (Accelerate's): no, fp16 or bf16.", show_default=default
        ),
    ]


def workers_option(default: int) -> Any:
    """``--workers`` (data loader processes), showing the stage config's ``default``."""
    return Annotated[int | None, typer.Option("--workers", help="Data loader processes.", show_default=str(default))]


def seed_option(default: int) -> Any:
    """``--seed``, showing the stage config's ``default``."""
    return Annotated[
        int | None,
        typer.Option("--seed", help="Random seed: the same seed gives the same output.", show_default=str(default)),
    ]


HubTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        help="Seconds to wait for the hub on each network call (connecting, each read) before giving up.",
        # core/hub.py's TIMEOUT_VARIABLE and DEFAULT_TIMEOUT_S (it imports tarfile and zipfile); tested
        show_default="$FREETUMOR_HUB_TIMEOUT, else 30",
        min=0.001,
    ),
]


def progress_bar(label: str | None = None) -> Any:
    """A transient progress bar on stderr: label (or the task's description), bar, done/total, elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns: list[Any] = [
        TextColumn(f"[bold]{label}[/] {{task.description}}" if label else "[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    columns.append(TimeElapsedColumn())
    return Progress(*columns, console=err_console, transient=True, disable=_quiet)


QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only warnings and errors: no progress, notes or summary.")
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Also print debug lines and the libraries' warnings.")
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="<auto|cpu|cuda|cuda:N>",
        help="Where the model runs: auto (a GPU if there is one), cpu, cuda or cuda:N.",
    ),
]

_quiet = False


def set_verbosity(*, quiet: bool, verbose: bool) -> None:
    """Apply -q / -v: quiet silences stdout and progress bars; verbose shows debug lines and warnings."""
    global _quiet
    import warnings

    if quiet and verbose:
        from freetumor_cli.core.errors import ConfigError

        raise ConfigError("--quiet and --verbose exclude each other", hint="pass one of them")
    _quiet = quiet
    console.quiet = quiet
    logger = logging.getLogger("freetumor")
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if verbose:
        show_library_log()
    else:
        # nibabel's header repairs ("setting 0 dims to 1") are refused with freetumor's own message.
        logging.getLogger("nibabel.global").setLevel(logging.ERROR)
        # The libraries' deprecation notices speak to developers, not to the people running freetumor.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(monai|torch)\.")


def one_line(exc: FreetumorError) -> str:
    """The error's message; of one re-raised from a data loader worker (its message then holds the
    worker's traceback), the original's last line."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


@contextlib.contextmanager
def stop_on_termination() -> Iterator[list[int]]:
    """Inside, SIGTERM (``kill``, a batch scheduler's preemption, torchrun stopping its workers) stops a
    command as Ctrl-C does: the write in progress is removed, finished outputs and the last saved state are
    kept, locks are released, and the exit code is 130. Only the main thread can install it; the previous
    handlers come back after the command, so a program that runs a command in its own process (a test, a
    notebook) keeps its own (a pool's workers forked later must still end on SIGTERM).

    Yields the signals received (SIGTERM, and SIGINT where Python's own handler had it): Python runs a
    handler wherever the main thread is, and a KeyboardInterrupt raised inside a destructor is printed and
    dropped, so the caller checks the list when the command returns."""
    import signal
    import threading

    received: list[int] = []

    def interrupt(signum: int, _frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def report_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Give a command ``-q/--quiet`` and ``-v/--verbose``, and turn a :class:`FreetumorError` into a
    one-line message and its exit code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, quiet: bool = False, verbose: bool = False, **kwargs: Any) -> Any:
        try:
            with stop_on_termination() as received:
                set_verbosity(quiet=quiet, verbose=verbose)
                result = func(*args, **kwargs)
                if received:  # an interrupt whose exception was dropped (raised inside a destructor)
                    raise KeyboardInterrupt(f"signal {received[0]}")
                return result
        except FreetumorError as exc:
            err_console.print(f"[bold red]error:[/] {escape(one_line(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished outputs are kept, none is half-written")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    signature = inspect.signature(func, eval_str=True)
    extra = [
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=QuietOption),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOption),
    ]
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


class OneLineUsageErrors(TyperGroup):
    """The app's group: usage errors (an unknown option, a value out of range, a missing one) as one line
    naming the option, with exit code 2, like every other error, instead of a framed multi-line box."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _usage_error_in_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _usage_error_in_one_line():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_error_in_one_line() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        # Click's usage errors (typer vendors its own click) format a message; Exit and Abort do not.
        if not hasattr(exc, "format_message") or type(exc).__name__ == "NoArgsIsHelpError":
            raise  # not a usage error, or "freetumor" alone: its help follows
        ctx = getattr(exc, "ctx", None)
        listed = "commands" if hasattr(getattr(ctx, "command", None), "commands") else "options"
        where = f" ({ctx.command_path} --help lists the {listed})" if ctx is not None else ""
        err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}{escape(where)}", soft_wrap=True)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from None


class _LogToConsole(logging.Handler):
    """The library's ``freetumor`` log lines, printed above the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[dim]{escape(record.getMessage())}[/]", soft_wrap=True)


def show_library_log() -> None:
    """Print the library's INFO lines (which data path a run uses, its step counts) on the console."""
    logger = logging.getLogger("freetumor")
    if not any(isinstance(h, _LogToConsole) for h in logger.handlers):
        logger.addHandler(_LogToConsole())
    if logger.level == logging.NOTSET:  # -q / -v set it
        logger.setLevel(logging.INFO)


def print_table(table: Any) -> None:
    """Print a rich ``Table`` whole: on a terminal, long cells wrap (folded, never cut with an ellipsis);
    into a pipe or file, the table is as wide as its longest row, so no class name or path is shortened."""
    for column in table.columns:
        column.overflow = "fold"
    if console.is_terminal or console.quiet:
        console.print(table)
        return
    width = console.measure(table, options=console.options.update_width(10**5)).maximum
    wide = Console(file=console.file, width=max(width, console.width), highlight=False, soft_wrap=True)
    wide.print(table)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)
