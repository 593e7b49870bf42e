"""``freetumor prepare``: validated, remapped data lists with folds from a data root."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freetumor_cli.commands._common import (
    ConfigOption,
    SeedOption,
    SetOption,
    console,
    progress_bar,
    report_errors,
    warn,
)


@report_errors
def prepare(
    data_root: Annotated[
        Path, typer.Option("--data-root", help="Data root: one folder per dataset (imagesTr/ + labelsTr/).")
    ] = Path("data"),
    out: Annotated[Path, typer.Option("--out", help="Output folder (never inside --data-root).")] = Path("prepared"),
    datasets: Annotated[
        list[str] | None,
        typer.Option(
            "--datasets", help="Datasets to use (repeatable). Default: every known folder found.", show_default=False
        ),
    ] = None,
    folds: Annotated[int | None, typer.Option("--folds", help="Cross-validation folds.", show_default="5")] = None,
    seed: SeedOption = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="Explicit pairing: CSV (image,label[,dataset][,case]) or MONAI data-list JSON.",
            show_default=False,
        ),
    ] = None,
    preprocess: Annotated[
        bool,
        typer.Option(
            "--preprocess",
            help="Also write resampled, windowed, cropped arrays to a cache keyed by the preprocessing config.",
        ),
    ] = False,
    verify_images: Annotated[
        bool,
        typer.Option(
            "--verify-images", help="Read every image fully (catches truncated files) instead of headers only."
        ),
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="Processes for validation and preprocessing.", min=1)] = 1,
    strict: Annotated[bool, typer.Option("--strict", help="Fail when any case is skipped.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Pair, validate and remap a data root into manifest.jsonl, per-task data lists with folds and reports.

    Example: freetumor prepare --data-root data --out prepared --folds 5 --workers 8
    """

    from freetumor_cli.core.config import build_config
    from freetumor_cli.core.prepare import PrepareConfig, preprocess_cache
    from freetumor_cli.core.prepare import prepare as run_prepare

    flags = {
        "datasets": list(datasets) if datasets else None,
        "folds": folds,
        "seed": seed,
        "preprocess": True if preprocess else None,
        "verify_images": True if verify_images else None,
        "strict": True if strict else None,
    }
    cfg = build_config(PrepareConfig, file=config, overrides=set_ or [], flags=flags)
    with progress_bar() as progress:
        task = progress.add_task("validate", total=None)
        result = run_prepare(
            data_root, out, cfg, pairs=pairs, workers=workers,
            on_found=lambda n: progress.update(task, total=n), on_case_done=lambda: progress.advance(task),
        )  # fmt: skip
        if cfg.preprocess:
            pp_task = progress.add_task("preprocess", total=None)
            cache, written, reused = preprocess_cache(
                out,
                cfg,
                workers=workers,
                on_start=lambda n: progress.update(pp_task, total=n),
                on_case_done=lambda: progress.advance(pp_task),
            )
    for name, report in sorted(result.reports.items()):
        line = f"{name}: {report.found} found, {report.valid} usable"
        if report.skipped:
            line += ", skipped: " + "; ".join(f"{reason} ({n})" for reason, n in report.skipped.most_common())
        console.print(line)
    if result.unknown_folders:
        warn(f"folders that are not known datasets were ignored: {', '.join(result.unknown_folders)}")
    console.print(
        f"{result.valid} usable case(s), {result.skipped} skipped; wrote manifest.jsonl, {len(result.datalists)} data lists, dataset.json, labels.json, prepare_report.md to {out}"
    )
    if cfg.preprocess:
        console.print(f"preprocessing cache {cache}: {written} case(s) written, {reused} reused")
