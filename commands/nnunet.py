"""``freetumor nnunet``: online tumor synthesis inside nnU-Net v2 training.

``trainer-path`` prints the folder for ``nnUNet_extTrainer``; ``dataset`` writes a raw nnU-Net dataset from a
prepared folder, organ-only cases included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freetumor_cli.commands._common import console, one_of, progress_bar, report_errors, warn
from freetumor_cli.core.registry import TASKS

nnunet_app = typer.Typer(
    name="nnunet",
    help="Online tumor synthesis inside nnU-Net v2 training (nnUNetTrainerFreeTumor).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@nnunet_app.command("trainer-path")
@report_errors
def trainer_path() -> None:
    """Print the folder nnU-Net searches for nnUNetTrainerFreeTumor.

    Example: export nnUNet_extTrainer="$(freetumor nnunet trainer-path)"
             nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerFreeTumor
    """
    from freetumor_cli.core.nnunet_ext import FOLDER, trainer_search_problem

    problem = trainer_search_problem()
    if problem:
        warn(problem)
    typer.echo(str(FOLDER))


@nnunet_app.command("dataset")
@report_errors
def dataset(
    data: Annotated[Path, typer.Option("--data", help="A prepared folder (freetumor prepare --out).")] = Path(
        "prepared"
    ),
    name: Annotated[
        str, typer.Option("--dataset", help="The dataset's folder name, DatasetNNN_Name (nnU-Net's naming).")
    ] = "Dataset501_FreeTumor",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", envvar="nnUNet_raw", help="nnU-Net's raw folder (default: $nnUNet_raw).", show_default=False
        ),
    ] = None,
    task: Annotated[
        one_of(TASKS),
        typer.Option(
            "--task",
            help="Which cases and labels: all (the abdomen's 7 classes, as prepared), covid (the chest's), "
            "or one organ's (0 background, 1 organ, 2 tumor).",
        ),
    ] = "all",
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy the CTs instead of linking to them (to move the dataset alone).")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="Processes that write the labels.", min=1)] = 1,
) -> None:
    """Write a raw nnU-Net v2 dataset from a prepared folder: tumor-labelled and organ-only cases together.

    Example: freetumor nnunet dataset --data prepared --dataset Dataset501_FreeTumor --out "$nnUNet_raw"
             nnUNetv2_plan_and_preprocess -d 501 --verify_dataset_integrity
    """
    from freetumor_cli.core.errors import ConfigError
    from freetumor_cli.core.nnunet import write_nnunet_dataset

    if out is None:
        raise ConfigError("where should the dataset go?", hint="pass --out, or set nnUNet_raw")
    with progress_bar("cases") as progress:
        bar = progress.add_task("cases", total=None)
        result = write_nnunet_dataset(
            data, out, name, task_name=task, copy=copy, workers=workers,
            on_start=lambda n: progress.update(bar, total=n), on_case_done=lambda _case: progress.advance(bar),
        )  # fmt: skip
    roles = ", ".join(f"{n} {role}" for role, n in sorted(result.roles.items()))
    console.print(
        f"{result.written + result.reused} case(s) ({roles}) in {result.folder}: {result.written} written, "
        f"{result.reused} already there"
    )
    if "organ-only" not in result.roles:
        warn("no organ-only case: nnUNetTrainerFreeTumor adds tumors to organ patches of any case without one")
    console.print(f"next: nnUNetv2_plan_and_preprocess -d {name[7:10]} --verify_dataset_integrity")
