"""``freetumor prepare``: validated, remapped data lists with folds from a data root."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from freetumor_cli.commands._common import (
    SET_EXAMPLES,
    ConfigOption,
    NumPartsOption,
    PartIdOption,
    console,
    one_of,
    progress_bar,
    report_errors,
    seed_option,
    set_option,
    warn,
)
from freetumor_cli.core.registry import PREPARE_LABEL_SCHEMES
from freetumor_cli.core.stage_configs import PrepareConfig

if TYPE_CHECKING:
    from freetumor_cli.core.store import BuildResult

DEFAULTS = PrepareConfig()


@report_errors
def prepare(
    data_root: Annotated[
        Path, typer.Option("--data-root", help="Data root: one folder per dataset (imagesTr/ + labelsTr/).")
    ] = Path("data"),
    out: Annotated[Path, typer.Option("--out", help="Output folder (never inside --data-root).")] = Path("prepared"),
    datasets: Annotated[
        list[str] | None,
        typer.Option(
            "--datasets",
            metavar="<NAME>",
            help="Datasets to use (repeatable; names or aliases). Default: every known folder found.",
            show_default=False,
        ),
    ] = None,
    folds: Annotated[
        int | None, typer.Option("--folds", help="Cross-validation folds.", show_default=str(DEFAULTS.folds))
    ] = None,
    seed: seed_option(DEFAULTS.seed) = None,  # type: ignore[valid-type]
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="Explicit pairing: CSV (image,label[,dataset][,case]) or MONAI data-list JSON.",
            show_default=False,
        ),
    ] = None,
    store: Annotated[
        bool,
        typer.Option(
            "--store/--no-store",
            help="Write the case store: every case preprocessed once (RAS, spacing, window, foreground crop), "
            "read a crop at a time by train-seg, train-synth and evaluate. Without it, training decodes and "
            "resamples a CT per sample.",
        ),
    ] = True,
    store_dir: Annotated[
        Path | None,
        typer.Option(
            "--store-dir",
            help="Where the store goes (default OUT/store); on a cluster, storage every node reads.",
            show_default=False,
        ),
    ] = None,
    num_parts: NumPartsOption = 1,
    part_id: PartIdOption = 0,
    organ_masks: Annotated[
        Path | None,
        typer.Option(
            "--organ-masks",
            help="Folder of organ masks (<case>.nii.gz or <case>_*.nii.gz, e.g. lungmask's outputs) merged into "
            "tumor labels that lack their organ, as the COVID-19-20 challenge's lesion-only labels do.",
            show_default=False,
        ),
    ] = None,
    label_scheme: Annotated[
        one_of(PREPARE_LABEL_SCHEMES) | None,
        typer.Option(
            "--label-scheme",
            help="How organ labels are encoded (organ-only and --pairs datasets; tumor datasets keep their own): "
            "freetumor (its label space), totalsegmentator (TotalSegmentator's multilabel output), or auto: a "
            "known dataset's in freetumor's space, others detected as synthesize does (a map whose values mean "
            "organs in both schemes is skipped, saying so).",
            show_default=DEFAULTS.label_scheme,
        ),
    ] = None,
    verify_images: Annotated[
        bool,
        typer.Option(
            "--verify-images", help="Read every image fully (catches truncated files) instead of headers only."
        ),
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="Processes for validation and preprocessing.", min=1)] = 1,
    strict: Annotated[bool, typer.Option("--strict", help="Fail when any case is skipped.")] = False,
    config: ConfigOption = None,
    set_: set_option(SET_EXAMPLES["prepare"]) = None,  # type: ignore[valid-type]
) -> None:
    """Pair, validate and remap a data root into manifest.jsonl, per-task data lists with folds and reports.

    Examples: freetumor prepare --data-root data --out prepared --folds 5 --workers 8
              freetumor prepare --out prepared --num-parts 16 --part-id $SLURM_ARRAY_TASK_ID   (after one prepare --no-store)
    """

    from freetumor_cli.core.config import build_config
    from freetumor_cli.core.errors import ConfigError
    from freetumor_cli.core.prepare import prepare as run_prepare

    if part_id >= num_parts:
        raise ConfigError(f"--part-id {part_id} must be below --num-parts {num_parts}")
    flags = {
        "datasets": list(datasets) if datasets else None,
        "folds": folds,
        "seed": seed,
        "store": store,
        "verify_images": True if verify_images else None,
        "organ_masks": str(organ_masks) if organ_masks else None,
        "strict": True if strict else None,
        "label_scheme": label_scheme,
    }
    cfg = build_config(PrepareConfig, file=config, overrides=set_ or [], flags=flags)
    if num_parts > 1:  # one share of the store of an already prepared folder
        _build_store(out, cfg, store_dir, workers=workers, num_parts=num_parts, part_id=part_id)
        return
    with progress_bar() as progress:
        task = progress.add_task("validate", total=None)
        store_task = progress.add_task("case store", total=None, visible=False)
        result = run_prepare(
            data_root, out, cfg, pairs=pairs, workers=workers, store_dir=store_dir,
            on_found=lambda n: progress.update(task, total=n), on_case_done=lambda: progress.advance(task),
            on_store_start=lambda n: progress.update(store_task, total=n, visible=True),
            on_store_case=lambda _name, _what: progress.advance(store_task),
        )  # fmt: skip
    for name, report in sorted(result.reports.items()):
        line = f"{name}: {report.found} found, {report.valid} usable"
        if report.skipped:
            line += ", skipped: " + "; ".join(f"{reason} ({n})" for reason, n in report.skipped.most_common())
        console.print(line)
    if result.unknown_folders:
        warn(f"folders that are not known datasets were ignored: {', '.join(result.unknown_folders)}")
    for message in result.warnings:
        warn(message)
    console.print(
        f"{result.valid} usable case(s), {result.skipped} skipped; wrote manifest.jsonl, {len(result.datalists)} data lists, dataset.json, labels.json, prepare_report.md to {out}"
    )
    if result.store is not None and result.store_dir is not None:
        _report_store(result.store_dir, result.store, "")
    elif not cfg.store:
        console.print("no case store (--no-store): training will decode and resample every sample's CT")


def _build_store(out: Path, cfg: object, store_dir: Path | None, *, workers: int, num_parts: int, part_id: int) -> None:
    from freetumor_cli.core.prepare import build_case_store

    with progress_bar() as progress:
        task = progress.add_task("case store", total=None)
        root, built = build_case_store(
            out, cfg, store_dir=store_dir, workers=workers, num_parts=num_parts, part_id=part_id,  # type: ignore[arg-type]
            on_start=lambda n: progress.update(task, total=n), on_case_done=lambda _name, _what: progress.advance(task),
        )  # fmt: skip
    _report_store(root, built, f" (part {part_id} of {num_parts})")


def _report_store(root: Path, built: BuildResult, part: str) -> None:
    stored = built.built + built.rebuilt + built.reused
    console.print(
        f"case store {root}{part}: {built.built} case(s) built, {built.rebuilt} rebuilt, {built.reused} up to date; "
        f"{built.bytes / 2**20 / max(stored, 1):.1f} MB per case, {built.seconds:.0f} s"
    )
    for name, error in list(built.failed.items())[:10]:
        warn(f"not stored (training reads it from its raw files): {name}: {error}")
