"""``freetumor train-synth``: the learned tumor generator."""

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
    warn,
    workers_option,
)
from freetumor_cli.core.registry import REGIONS, region_organs, region_tasks
from freetumor_cli.core.stage_configs import TrainSynthConfig

DEFAULTS = TrainSynthConfig()


@report_errors
def train_synth(
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="The frozen critic: a baseline of a task of the region ("
            + "; ".join(f"{r}: {', '.join(region_tasks(r))}" for r in REGIONS)
            + "), a train-seg checkpoint or the authors' .pt. Optional with --init TGAN.pt (its netSeg).",
            show_default=False,
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Fine-tune from a generator: a train-synth checkpoint or the authors' TGAN.pt (generator and discriminator).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[Path, typer.Option("--data", help="Output folder of freetumor prepare.")] = Path("prepared"),
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/synth"),
    region: Annotated[
        one_of(REGIONS) | None,
        typer.Option(
            "--region",
            help="The generator's region: "
            + "; ".join(f"{r} ({', '.join(o.tumor_name + 's' for o in region_organs(r))})" for r in REGIONS)
            + ".",
            show_default=DEFAULTS.region,
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Epochs over the oversampled mix.", show_default=str(DEFAULTS.epochs))
    ] = None,
    max_steps: MaxStepsOption = None,
    mixed_precision: mixed_precision_option(DEFAULTS.mixed_precision) = None,  # type: ignore[valid-type]
    workers: workers_option(DEFAULTS.workers) = None,  # type: ignore[valid-type]
    resume: ResumeOption = False,
    seed: seed_option(DEFAULTS.seed) = None,  # type: ignore[valid-type]
    config: ConfigOption = None,
    set_: set_option(SET_EXAMPLES["train-synth"]) = None,  # type: ignore[valid-type]
    device: DeviceOption = "auto",
) -> None:
    """Train the tumor generator against a voxel discriminator and the frozen baseline segmentor.

    Example: freetumor train-synth --data prepared --baseline runs/all_baseline/checkpoints/best --out runs/synth
    """
    from freetumor_cli.core.config import build_config
    from freetumor_cli.core.train_synth import train_generator

    flags = {
        "region": region,
        "epochs": epochs,
        "max_steps": max_steps,
        "mixed_precision": mixed_precision,
        "workers": workers,
        "seed": seed,
        "init": str(init) if init else None,
    }
    cfg = build_config(TrainSynthConfig, file=config, overrides=set_ or [], flags=flags)
    show_library_log()
    with progress_bar("train-synth") as progress:
        bar = progress.add_task("", total=None)

        def on_step(step: int, total: int, stats: dict[str, float]) -> None:
            progress.update(
                bar, completed=step, total=total, description=f"G {stats['loss_g']:.3f} D {stats['loss_d']:.3f}"
            )

        summary = train_generator(data, out, cfg, baseline=baseline, resume=resume, on_step=on_step, device=device)
    if not summary.is_main_process:
        return
    for message in summary.warnings:
        warn(message)
    last = f"{summary.generator_qc[-1]:.0%}" if summary.generator_qc else "n/a"
    console.print(
        f"{summary.steps} steps; held-out QC pass rate: generator {last}, rule-based engine {summary.rules_qc:.0%}"
    )
    console.print(
        f"generator: {out / 'checkpoints' / 'best'} (best QC pass rate), metrics: {out / 'metrics.jsonl'}, previews: {out / 'previews'}"
    )
