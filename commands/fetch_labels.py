"""``freetumor fetch-labels``: organ labels from the Hugging Face dataset into a data root."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freetumor_cli.commands._common import (
    HubTimeoutOption,
    console,
    note,
    print_table,
    progress_bar,
    report_errors,
    warn,
)


@report_errors
def fetch_labels(
    dest: Annotated[Path, typer.Option("--dest", help="Data root to download into (one folder per dataset).")] = Path(
        "data"
    ),
    datasets: Annotated[
        list[str] | None,
        typer.Option(
            "--datasets",
            metavar="<NAME>",
            help="Datasets to download (repeatable; names or aliases). Default: all the repository holds.",
            show_default=False,
        ),
    ] = None,
    revision: Annotated[str, typer.Option("--revision", help="Branch, tag or commit of the repository.")] = "main",
    list_only: Annotated[
        bool, typer.Option("--list", help="Show what the repository holds, download nothing.")
    ] = False,
    token: Annotated[
        str | None, typer.Option("--token", help="Hugging Face token (default: HF_TOKEN).", show_default=False)
    ] = None,
    repo: Annotated[str, typer.Option("--repo", help="Dataset repository on the hub.")] = "Luffy503/FreeTumor",
    workers: Annotated[int, typer.Option("--workers", help="Parallel downloads.", min=1)] = 8,
    keep_archives: Annotated[
        bool, typer.Option("--keep-archives", help="Keep downloaded archives after extracting them.")
    ] = False,
    timeout: HubTimeoutOption = None,
) -> None:
    """Download organ labels from the Hugging Face dataset Luffy503/FreeTumor into a data root.

    Datasets published as archives (BTCV.zip, BTCV.tar.gz, or parts Flare23.zip.001 ...) are downloaded,
    checked and extracted safely into DEST/<dataset>/. The hub endpoint comes from HF_ENDPOINT; with
    HF_HUB_OFFLINE=1 a complete local copy is used. Interrupted (Ctrl-C, SIGTERM, a kill) or cut off by
    a fault of the hub, a rerun resumes each file where it stopped.

    Example: freetumor fetch-labels --dest data --datasets BTCV --datasets Flare22
    """
    from rich.table import Table

    from freetumor_cli.core.hub import fetch_labels as run_fetch
    from freetumor_cli.core.hub import format_size, list_remote

    if list_only:
        listing = list_remote(repo, revision=revision, token=token, timeout=timeout)
        table = Table(title=f"{repo} @ {listing.commit[:12]}")
        for column in ("dataset", "files", "size", "archives"):
            table.add_column(column)
        archives = listing.archives()
        for dataset, files in sorted(listing.by_dataset().items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
            packed = [
                f"{name} ({len(parts)} parts, {format_size(sum(p.size for p in parts))})"
                if len(parts) > 1
                else f"{name} ({format_size(parts[0].size)})"
                for name, parts in archives.items()
                if parts[0].dataset == dataset
            ]
            table.add_row(
                dataset or "(not understood)",
                str(len(files)),
                format_size(sum(f.size for f in files)),
                ", ".join(packed) or "-",
            )
        print_table(table)
        for f in [f for f in listing.files if f.dataset is None][:20]:
            note(f"not understood: {f.path}")
        for path in listing.unsafe:
            warn(f"refused (path leaves the destination): {path}")
        return

    progress = progress_bar("fetch-labels")
    state: dict[str, int] = {}

    def on_listing(files: list) -> None:  # type: ignore[type-arg]
        state["task"] = progress.add_task("", total=len(files))

    with progress:
        result = run_fetch(
            dest, repo=repo, datasets=datasets, revision=revision, token=token, workers=workers,
            keep_archives=keep_archives, timeout=timeout, on_listing=on_listing, on_file_done=lambda f, _new: progress.advance(state["task"]),
        )  # fmt: skip
    for message in result.notes:
        note(message)
    for name, count in result.extracted.items():
        console.print(f"extracted {name}: {count} file(s)")
    table = Table(title=f"labels in {dest}")
    for column in ("dataset", "downloaded", "up to date", "size"):
        table.add_column(column)
    groups: dict[str, list[int]] = {}
    for f in result.downloaded:
        groups.setdefault(f.dataset or "?", [0, 0, 0])[0] += 1
        groups[f.dataset or "?"][2] += f.size
    for f in result.up_to_date:
        groups.setdefault(f.dataset or "?", [0, 0, 0])[1] += 1
        groups[f.dataset or "?"][2] += f.size
    for dataset, (new, old, size) in sorted(groups.items()):
        table.add_row(dataset, str(new), str(old), format_size(size))
    print_table(table)
    if result.unknown:
        warn(
            f"{len(result.unknown)} file(s) in the repository are not under a known dataset folder and were not downloaded, e.g. {', '.join(f.path for f in result.unknown[:5])}"
        )
    for path in result.unsafe:
        warn(f"refused (path leaves the destination): {path}")
    if not result.downloaded and not result.offline:
        console.print(f"nothing to download: {len(result.up_to_date)} file(s) already up to date in {dest}")
    else:
        console.print(
            f"{len(result.downloaded)} file(s) downloaded, {len(result.up_to_date)} already present, in {dest}"
        )
