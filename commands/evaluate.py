"""``freetumor evaluate``: score predictions against ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freetumor_cli.commands._common import (
    SET_EXAMPLES,
    ConfigOption,
    DeviceOption,
    console,
    note,
    one_of,
    print_table,
    progress_bar,
    report_errors,
    set_option,
    warn,
)
from freetumor_cli.core.errors import ConfigError
from freetumor_cli.core.registry import EVAL_SPACES
from freetumor_cli.core.stage_configs import EvaluateConfig

DEFAULTS = EvaluateConfig()


@report_errors
def evaluate(
    pred: Annotated[
        Path | None,
        typer.Option(
            "--pred", help="Folder of predicted label maps (case.nii.gz or case_0000.nii.gz).", show_default=False
        ),
    ] = None,
    gt: Annotated[
        Path | None,
        typer.Option("--gt", help="Folder of ground-truth label maps, or a MONAI data-list JSON.", show_default=False),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint", help="Predict with this checkpoint folder first (needs --data).", show_default=False
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="With --checkpoint: a MONAI data list, a folder of CTs, or one CT. Labels, when known, are scored.",
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        float, typer.Option("--overlap", help="Sliding-window overlap (with --checkpoint).", min=0.0, max=0.99)
    ] = 0.75,
    split: Annotated[
        one_of(("validation", "training", "all")),
        typer.Option("--split", help="With --checkpoint and a fold's data list: which of its cases to predict."),
    ] = "validation",
    tta: Annotated[bool, typer.Option("--tta", help="Flip test-time augmentation (with --checkpoint).")] = False,
    device: DeviceOption = "auto",
    out: Annotated[Path, typer.Option("--out", help="Output folder for CSVs, summaries and plots.")] = Path(
        "evaluation"
    ),
    classes: Annotated[
        list[str] | None,
        typer.Option(
            "--classes",
            metavar="<CLASS>",
            help="Class names or values to score (repeatable). Default: the scheme's tumor classes.",
            show_default=False,
        ),
    ] = None,
    label_space: Annotated[
        one_of(EVAL_SPACES) | None,
        typer.Option(
            "--label-space",
            help="The label space both folders are in: "
            + "; ".join(f"{n} ({', '.join(v for k, v in s.items() if k)})" for n, s in EVAL_SPACES.items())
            + ". TotalSegmentator masks are none: prepare --label-scheme totalsegmentator maps them into abdomen.",
            show_default=DEFAULTS.label_space,
        ),
    ] = None,
    tolerance_mm: Annotated[
        float | None,
        typer.Option(
            "--tolerance-mm", help="Normalized surface Dice tolerance in mm.", show_default=f"{DEFAULTS.tolerance_mm:g}"
        ),
    ] = None,
    min_lesion_voxels: Annotated[
        int | None,
        typer.Option(
            "--min-lesion-voxels",
            help="Ignore connected components smaller than this.",
            show_default=str(DEFAULTS.min_lesion_voxels),
        ),
    ] = None,
    lesion_iou: Annotated[
        float | None,
        typer.Option(
            "--lesion-iou",
            help="IoU a lesion match needs; 0 = any overlapping voxel.",
            show_default=f"{DEFAULTS.lesion_iou:g}",
        ),
    ] = None,
    skip_missing: Annotated[
        bool, typer.Option("--skip-missing", help="Skip cases without a prediction instead of scoring them as empty.")
    ] = False,
    resample_pred: Annotated[
        bool,
        typer.Option(
            "--resample-pred", help="Resample predictions on another grid onto the ground truth's (nearest neighbour)."
        ),
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="Processes scoring cases in parallel.", min=1)] = 1,
    config: ConfigOption = None,
    set_: set_option(SET_EXAMPLES["evaluate"]) = None,  # type: ignore[valid-type]
) -> None:
    """Score predicted segmentations: Dice, surface Dice, HD95, surface distance, lesion detection by size.

    Either score a folder of predictions (--pred, --gt), or predict with a checkpoint first
    (--checkpoint, --data): predictions go to OUT/predictions in each input's geometry.

    Examples: freetumor evaluate --pred predictions/ --gt labelsTs/ --out evaluation/
              freetumor evaluate --checkpoint runs/liver/checkpoints/best --data prepared/datalists/liver_fold0.json
    """
    from rich.table import Table

    from freetumor_cli.core.cases import match_cases
    from freetumor_cli.core.config import build_config
    from freetumor_cli.core.evaluate import evaluate as run_evaluation
    from freetumor_cli.core.evaluate import predict_for_scoring, summary_table, write_reports
    from freetumor_cli.core.outputs import OutputLock

    flags = {
        "label_space": label_space,
        "classes": list(classes) if classes else None,
        "tolerance_mm": tolerance_mm,
        "min_lesion_voxels": min_lesion_voxels,
        "lesion_iou": lesion_iou,
        "skip_missing": True if skip_missing else None,
        "resample_pred": True if resample_pred else None,
    }
    cfg = build_config(EvaluateConfig, file=config, overrides=set_ or [], flags=flags)
    if checkpoint is not None and data is None:
        raise ConfigError("--checkpoint needs --data: a data list, a folder of CTs or one CT")
    if checkpoint is None and (pred is None or gt is None):
        raise ConfigError("pass --pred and --gt to score predictions, or --checkpoint and --data to predict first")
    with OutputLock(out, "evaluate"):  # a second run into the same --out stops at once
        if checkpoint is not None:
            with progress_bar("predict") as progress:
                bar = progress.add_task("", total=None)
                pred, gt, cfg, source = predict_for_scoring(
                    checkpoint, data, out, cfg, overlap=overlap, tta=tta, split=split, device=device,
                    on_case_done=lambda _p: progress.advance(bar),
                )  # fmt: skip
            note(f"images: {source}")
            if gt is None:
                console.print(f"predictions written to {pred} (no labels known for these images: nothing to score)")
                return
        total = len(match_cases(pred, gt)[0])
        with progress_bar("evaluate") as progress:
            task = progress.add_task("", total=total)
            cases, summary, notes = run_evaluation(
                pred, gt, cfg, workers=workers, on_case_done=lambda _case: progress.advance(task)
            )
        for message in notes:
            (warn if "without a prediction" in message or "match no" in message else note)(message)
        written = write_reports(cases, summary, out)
        headings, rows = summary_table(summary, where="cli")
        table = Table(title=f"{summary['cases']} cases")
        for heading in headings:
            table.add_column(heading)
        for row in rows:
            table.add_row(*row)
        print_table(table)
        console.print(
            f"wrote {len(written)} files to {out} (summary.md, summary.json, metrics_per_case.csv, metrics_per_lesion.csv, plots)"
        )
