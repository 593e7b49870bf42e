"""``freetumor fetch-weights``: the authors' released weights, downloaded once and converted."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freetumor_cli.commands._common import HubTimeoutOption, console, one_of, print_table, progress_bar, report_errors
from freetumor_cli.core.registry import TASKS


@report_errors
def fetch_weights(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="NAME", help="Which: baseline, covid-baseline, tgan or voco (default: all).", show_default=False
        ),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Cache folder (default: $FREETUMOR_HOME, else ~/.freetumor).", show_default=False),
    ] = None,
    list_only: Annotated[bool, typer.Option("--list", help="Show the released files and where they go.")] = False,
    revision: Annotated[str, typer.Option("--revision", help="Branch, tag or commit of the repositories.")] = "main",
    token: Annotated[
        str | None, typer.Option("--token", help="Hugging Face token (default: HF_TOKEN).", show_default=False)
    ] = None,
    convert: Annotated[
        Path | None,
        typer.Option(
            "--convert", help="Convert a local .pt file of the authors instead (with --out).", show_default=False
        ),
    ] = None,
    task: Annotated[
        one_of(TASKS) | None,
        typer.Option(
            "--task",
            help="With --convert: the task a segmentor predicts (when its name does not say).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="With --convert: the checkpoint folder to write.", show_default=False)
    ] = None,
    timeout: HubTimeoutOption = None,
) -> None:
    """Download the authors' released weights (model repository Luffy503/FreeTumor) and convert them once
    into checkpoint folders every command takes.

    Example: freetumor fetch-weights baseline tgan   then   --baseline ~/.freetumor/checkpoints/baseline
    """
    from rich.table import Table

    from freetumor_cli.core.errors import ConfigError, OutputExistsError
    from freetumor_cli.core.weights import RELEASED, usable_path, weights_home
    from freetumor_cli.core.weights import fetch_weights as run_fetch

    root = weights_home(home)
    if convert is not None:
        from freetumor_cli.core.checkpoints import convert_released

        if out is None:
            raise ConfigError("--convert needs --out: the checkpoint folder to write")
        if out.exists():
            raise OutputExistsError(f"--out {out} exists", hint="choose a new folder")
        written = convert_released(convert, out, task=task)
        console.print(f"converted {convert} -> {written}")
        return
    if list_only:
        table = Table(title=f"released weights (cache: {root})")
        for column in ("name", "file", "use", "path to pass"):
            table.add_column(column)
        for w in RELEASED.values():
            table.add_row(w.name, f"{w.repo}/{w.path}", w.use, str(usable_path(root, w)))
        print_table(table)
        return
    with progress_bar("fetch-weights") as progress:
        bar = progress.add_task("", total=len(names or RELEASED))
        result = run_fetch(
            names,
            home=home,
            revision=revision,
            token=token,
            timeout=timeout,
            on_file_done=lambda _n, _w: progress.advance(bar),
        )
    for name, path in result.paths.items():
        state = "downloaded" if name in result.downloaded else "converted" if name in result.converted else "up to date"
        console.print(f"{name}: {path} ({state})")
    if result.offline:
        console.print(f"offline: used the complete cache in {root}")
