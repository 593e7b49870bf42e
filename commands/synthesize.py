"""``freetumor synthesize``: insert tumors into CT scans."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from freetumor_cli.commands._common import (
    SET_EXAMPLES,
    ConfigOption,
    DeviceOption,
    NumPartsOption,
    PartIdOption,
    console,
    err_console,
    note,
    one_of,
    progress_bar,
    report_errors,
    seed_option,
    set_option,
    warn,
)
from freetumor_cli.core.errors import EXIT_PARTIAL, FreetumorError
from freetumor_cli.core.registry import ENGINES, LABEL_SCHEMES, ORGANS, choices_help
from freetumor_cli.core.synthesis_config import LAYOUTS, SIZE_CHOICES, SynthesisConfig, SynthesizeConfig

if TYPE_CHECKING:
    from freetumor_cli.core.cases import Case
    from freetumor_cli.core.synthesize import CaseResult, SynthesisRun

DEFAULTS = SynthesizeConfig()


def _parse_count(value: str | None) -> int | str | None:
    if value is None:
        return None
    if value == "auto":
        return "auto"
    try:
        count = int(value)
    except ValueError:
        raise typer.BadParameter(
            f"expected a positive integer or 'auto', got {value!r}", param_hint="'--count'"
        ) from None
    if count < 1:
        raise typer.BadParameter("must be at least 1", param_hint="'--count'")
    return count


@report_errors
def synthesize(
    input_path: Annotated[
        Path,
        typer.Option(
            "--in",
            "-i",
            help="CT in NIfTI (any orientation and spacing), a folder of CTs, a DICOM series folder (with --labels; needs freetumor\\[dicom]), or a MONAI data-list JSON.",
            show_default=False,
        ),
    ],
    organ: Annotated[
        one_of(ORGANS),
        typer.Option("--organ", help=f"Target organ: {choices_help(ORGANS)}.", show_default=False),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            "-l",
            help="Organ labels: freetumor scheme, TotalSegmentator multilabel output or binary mask (a folder of them for a folder of CTs). Default: labelsTr/<case>.nii.gz beside imagesTr/.",
            show_default=False,
        ),
    ] = None,
    label_scheme: Annotated[
        one_of(LABEL_SCHEMES) | None,
        typer.Option("--label-scheme", help="How the organ labels are encoded.", show_default=DEFAULTS.label_scheme),
    ] = None,
    size: Annotated[
        one_of(SIZE_CHOICES) | None,
        typer.Option(
            "--size",
            help="Tumor size class by base radius: "
            + ", ".join(f"{n} {SynthesisConfig().size_class(n).radius_mm:g} mm" for n in SIZE_CHOICES[:-1])
            + ". mix: with --count N, a class per tumor among those the organ holds; with --count auto, one class "
            "per output, then a count from that class's range.",
            show_default=DEFAULTS.size,
        ),
    ] = None,
    count: Annotated[
        str | None,
        typer.Option(
            "--count",
            "-n",
            metavar="<N|auto>",
            help="Tumors per output, or 'auto' for the method's range (tiny/small 3-10, medium 2-5, large 1-3).",
            show_default=str(DEFAULTS.count),
        ),
    ] = None,
    radius_mm: Annotated[
        float | None,
        typer.Option("--radius-mm", help="Exact tumor radius in mm (overrides --size).", show_default=False),
    ] = None,
    seed: seed_option(DEFAULTS.seed) = None,  # type: ignore[valid-type]
    copies: Annotated[
        int | None,
        typer.Option(
            "--copies",
            help="Variants per input, each with its own stream (seed, case id, copy).",
            show_default=str(DEFAULTS.copies),
        ),
    ] = None,
    engine: Annotated[
        one_of(ENGINES) | None,
        typer.Option(
            "--engine",
            help="Synthesis engine: rules (no training needed) or generator (implied by --generator).",
            show_default=DEFAULTS.engine,
        ),
    ] = None,
    generator: Annotated[
        Path | None,
        typer.Option(
            "--generator",
            help="Generator checkpoint from train-synth or fetch-weights (implies --engine generator).",
            show_default=False,
        ),
    ] = None,
    preview: Annotated[
        bool, typer.Option("--preview", help="Also write a PNG: slices through each tumor, before and after.")
    ] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("synthetic"),
    layout: Annotated[
        one_of(LAYOUTS) | None,
        typer.Option(
            "--layout",
            help="flat: every file in --out; nnunet: a raw nnU-Net v2 dataset (--dataset); monai: flat plus datalist.json.",
            show_default=DEFAULTS.layout,
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            metavar="<DatasetNNN_Name>",
            help="The dataset folder of --layout nnunet (needs it).",
            show_default=DEFAULTS.dataset,
        ),
    ] = None,
    device: DeviceOption = "auto",
    workers: Annotated[
        int,
        typer.Option("--workers", help="Cases synthesized in parallel (processes) for folders and data lists.", min=1),
    ] = 1,
    num_parts: NumPartsOption = 1,
    part_id: PartIdOption = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    config: ConfigOption = None,
    set_: set_option(SET_EXAMPLES["synthesize"]) = None,  # type: ignore[valid-type]
) -> None:
    """Insert realistic synthetic tumors into CT scans (rule-based engine, no training needed).

    Writes <case>_<organ>_synthetic.nii.gz (the CT with tumors, input geometry and dtype),
    <case>_<organ>_synthetic_label.nii.gz (organs and tumors, freetumor scheme) and
    <case>_<organ>_synthetic.json. A rerun skips the cases already done with the same settings.

    Example: freetumor synthesize --in ct.nii.gz --labels seg.nii.gz --organ liver --preview
    """

    from freetumor_cli.core.config import build_config
    from freetumor_cli.core.synthesize import copy_name, synthesize_cases

    parsed_count = _parse_count(count)
    flags = {
        "organ": organ,
        "label_scheme": label_scheme,
        "size": size,
        "radius_mm": radius_mm,
        "seed": seed,
        "copies": copies,
        "engine": engine or ("generator" if generator else None),  # --generator alone means use it
        "generator": str(generator) if generator else None,
        "preview": True if preview else None,
        "overwrite": True if overwrite else None,
        "layout": layout,
        "dataset": dataset,
    }
    if parsed_count is not None:
        flags["count"] = None if parsed_count == "auto" else parsed_count
    cfg = build_config(SynthesizeConfig, file=config, overrides=set_ or [], flags=flags)
    if parsed_count == "auto":
        cfg = _with_auto_count(cfg)
    from freetumor_cli.core.devices import check_device_name, resolve_device

    if cfg.engine == "generator":
        device = resolve_device(device)
    elif check_device_name(device) != "auto":
        note("the rules engine runs on the CPU: --device applies to --engine generator")
    with progress_bar("synthesize") as progress:
        task = progress.add_task("", total=None)

        def on_start(run: SynthesisRun) -> None:
            if run.part is not None:
                note(f"part {run.part[0]} of {run.part[1]}: {len(run.cases)} of {run.all_cases} case(s)")
            progress.update(task, total=len(run.cases) * cfg.copies)

        def on_case(case: Case, result: CaseResult | FreetumorError) -> None:
            if isinstance(result, FreetumorError):
                warn(f"skipped {case.name}: {result}")
                return
            for message in result.warnings:
                warn(message)
            for message in result.notes:
                note(message)
            for index, tumors in enumerate(result.tumors, start=1):
                name = copy_name(case.name, [index if cfg.copies > 1 else None])
                console.print(f"{name}: {len(tumors)} {ORGANS[cfg.organ].tumor_name}(s): {_describe(tumors)}")

        run = synthesize_cases(
            input_path, labels, cfg, out, device=device, workers=workers, num_parts=num_parts, part_id=part_id,
            on_start=on_start, on_copy_done=lambda: progress.advance(task), on_case=on_case,
        )  # fmt: skip
    already = f" ({run.done_before} case(s) done before, skipped)" if run.done_before else ""
    console.print(f"wrote {run.written} output set(s) to {out}{already}", highlight=False)
    if run.failures:
        err_console.print(f"[red]{len(run.failures)} of {len(run.cases)} case(s) failed[/]")
        raise typer.Exit(EXIT_PARTIAL)


def _describe(tumors: list) -> str:  # type: ignore[type-arg]
    """Each tumor up to five; beyond, a summary per size class (the JSON record lists them all)."""
    if len(tumors) <= 5:
        return ", ".join(f"{t.size_class} {t.volume_ml:.1f} ml ({t.mean_hu_change:+.0f} HU)" for t in tumors)
    parts = []
    for size in dict.fromkeys(t.size_class for t in tumors):
        group = [t for t in tumors if t.size_class == size]
        ml = [t.volume_ml for t in group]
        hu = [t.mean_hu_change for t in group]
        parts.append(f"{len(group)} {size} {min(ml):.1f}-{max(ml):.1f} ml ({min(hu):+.0f} to {max(hu):+.0f} HU)")
    return "; ".join(parts)


def _with_auto_count(cfg: SynthesizeConfig) -> SynthesizeConfig:
    from dataclasses import replace

    return replace(cfg, count=None)
