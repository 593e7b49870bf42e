"""``freetumor train-seg``: the baseline segmentor, or training with online synthetic tumors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freetumor_cli.commands._common import (
    SET_EXAMPLES,
    ConfigOption,
    DeviceOption,
    MaxStepsOption,
    ResumeOption,
    console,
    mixed_precision_option,
    one_of,
    progress_bar,
    report_errors,
    seed_option,
    set_option,
    show_library_log,
    workers_option,
)
from freetumor_cli.core.registry import MODELS, TASKS, choices_help
from freetumor_cli.core.stage_configs import TrainSegConfig

MODES = ("onlylabeled", "freesyn")
DEFAULTS = TrainSegConfig()


@report_errors
def train_seg(
    data: Annotated[Path, typer.Option("--data", help="Output folder of freetumor prepare.")] = Path("prepared"),
    organ: Annotated[
        one_of(TASKS) | None,
        typer.Option(
            "--organ",
            help=f"What the network segments (config key: task): {choices_help(TASKS)}.",
            show_default=DEFAULTS.task,
        ),
    ] = None,
    mode: Annotated[
        one_of(MODES) | None,
        typer.Option(
            "--mode",
            "--task",
            help="How it trains (config key: mode): onlylabeled (real tumors; the baseline) | freesyn (real + "
            "online synthetic tumors). --task is an alias of --mode (the method's name for it).",
            show_default=DEFAULTS.mode,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/seg"),
    fold: Annotated[
        int | None,
        typer.Option("--fold", help="Validation fold of the prepared data lists.", show_default=str(DEFAULTS.fold)),
    ] = None,
    model: Annotated[
        one_of(MODELS) | None,
        typer.Option(
            "--model",
            help="swinunetr (the method's), unet (CPU-friendly) or unet-tiny (tests).",
            show_default=DEFAULTS.model,
        ),
    ] = None,
    synth: Annotated[
        str | None,
        typer.Option(
            "--synth",
            metavar="<rules|PATH>",
            help="Tumors for freesyn: rules (no training needed), a generator from train-synth, or the authors' "
            "TGAN.pt (its own baseline then does quality control unless --baseline is given).",
            show_default=DEFAULTS.synth,
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from these weights: VoCo's self-supervised .pt (the authors' --use_ssl_pretrained) or a "
            "checkpoint folder; tensors whose name and shape match are copied.",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="Checkpoint folder of a baseline segmentor: enables quality control of synthetic tumors.",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Epochs (default 100 onlylabeled, 20 freesyn).", show_default=False)
    ] = None,
    max_steps: MaxStepsOption = None,
    mixed_precision: mixed_precision_option(DEFAULTS.mixed_precision) = None,  # type: ignore[valid-type]
    workers: workers_option(DEFAULTS.workers) = None,  # type: ignore[valid-type]
    resume: ResumeOption = False,
    seed: seed_option(DEFAULTS.seed) = None,  # type: ignore[valid-type]
    config: ConfigOption = None,
    set_: set_option(SET_EXAMPLES["train-seg"]) = None,  # type: ignore[valid-type]
    device: DeviceOption = "auto",
) -> None:
    """Train a tumor segmentation network (Accelerate: CPU, one GPU or many with accelerate launch).

    Example: freetumor train-seg --data prepared --organ liver --mode onlylabeled --out runs/liver_baseline
    """
    from freetumor_cli.core.config import build_config
    from freetumor_cli.core.train_seg import train_segmentation

    flags = {
        "task": organ, "mode": mode, "fold": fold, "model": model, "synth": synth, "epochs": epochs,
        "max_steps": max_steps, "mixed_precision": mixed_precision, "workers": workers, "seed": seed,
        "init": str(init) if init else None,
    }  # fmt: skip
    cfg = build_config(TrainSegConfig, file=config, overrides=set_ or [], flags=flags).resolved()
    show_library_log()
    with progress_bar("train-seg") as progress:
        bar = progress.add_task("", total=None)

        validation = progress.add_task("validation", total=None, visible=False)

        def on_step(step: int, total: int, stats: dict[str, float]) -> None:
            speed = f", {stats['crops_per_s']:.1f} crops/s" if "crops_per_s" in stats else ""
            progress.update(bar, completed=step, total=total, description=f"loss {stats['loss']:.3f}{speed}")

        def on_validation(done: int, total: int) -> None:
            progress.update(validation, completed=done, total=total, visible=done < total, description="validation")

        summary = train_segmentation(
            data, out, cfg, baseline=baseline, resume=resume, on_step=on_step, on_validation=on_validation,
            device=device,
        )  # fmt: skip
    if not summary.is_main_process:
        return
    qc = (
        f", quality control kept {summary.qc_acceptance:.0%} of synthetic tumors"
        if summary.qc_acceptance is not None
        else ""
    )
    console.print(
        f"{summary.steps} steps, last loss {summary.losses[-1] if summary.losses else float('nan'):.4f}, {summary.validation}{qc}"
    )
    console.print(
        f"checkpoints: {out / 'checkpoints' / 'best'}, {out / 'checkpoints' / 'last'}; metrics: {out / 'metrics.jsonl'}"
    )
