"""``freetumor demo``: the whole pipeline on built-in phantoms, no data and no network needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freetumor_cli.commands._common import console, print_table, progress_bar, report_errors, seed_option


@report_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (its demo files are re-created on every run).")
    ] = Path("freetumor_demo"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="A short run (under 5 minutes on 2 CPU cores): shows every stage, not the effect."
        ),
    ] = False,
    # DemoConfig's seed: core/demo imports the numeric stack; tests/test_cli_defaults.py checks the copy.
    seed: seed_option(0) = None,  # type: ignore[valid-type]
) -> None:
    """Run the whole method on phantom CTs: prepare, a baseline, a generator, six arms, synthesize, evaluate.

    A paired experiment on a held-out test set: every arm continues from one baseline for the same steps and crops (A labelled only, A′ + organ-only crops, B + rule-based tumors, C + quality control, C′ rules at the generator's contrast, D + generator tumors with quality control, the method), and OUT/report.md gives each difference with its 95 % interval and the tumors' contrast. The default preset takes about 20 minutes on 2 CPU cores (its baseline trains 2000 steps, where its Dice plateaus); --quick under 2.

    Example: freetumor demo --quick --out freetumor_demo
    """
    from rich.table import Table

    from freetumor_cli.core.demo import COMPARISON_COLUMNS, MODELS, DemoConfig, run_demo
    from freetumor_cli.core.fair import label

    config = DemoConfig.preset(quick=quick, seed=seed or 0)
    with progress_bar("demo") as progress:
        bar = progress.add_task("", total=None, visible=False)

        def on_step(message: str) -> None:
            progress.console.print(f"[bold]>[/] {message}")
            progress.update(bar, completed=0, total=None, visible=False)

        def on_progress(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total, visible=True, description="training")

        result = run_demo(out, config, on_step=on_step, on_progress=on_progress)
    table = Table(title=f"held-out phantom test set: {config.test_cases} CTs, liver tumors")
    table.add_column("model")
    for column in COMPARISON_COLUMNS:
        table.add_column(column, justify="right")
    for name, row in result.comparison.items():
        table.add_row(label(name), *("n/a" if row[c] is None else f"{row[c]:.3f}" for c in COMPARISON_COLUMNS))
    print_table(table)
    for name, what in MODELS.items():
        console.print(f"  {label(name)}: {what}")
    paired = Table(title="paired: arm X minus arm Y on the same test CTs")
    for column in ("comparison", "Δ tumor Dice", "95 % CI", "Wilcoxon p", "lesions X / Y", "McNemar p"):
        paired.add_column(column, justify="right")
    for r in result.paired:
        paired.add_row(
            r["comparison"], f"{r['dice_diff']:+.3f}", f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
            f"{r['wilcoxon_p']:.2g}", f"{r['sens_x']:.2f} / {r['sens_y']:.2f}", f"{r['mcnemar_p']:.2g}",
        )  # fmt: skip
    print_table(paired)
    kept = ", ".join(f"{label(arm)} {v:.0%}" for arm, v in result.qc_acceptance.items() if v is not None)
    if kept:
        console.print(f"quality control kept: {kept} of the synthetic tumors")
    if quick:
        console.print(
            "--quick trains for a few minutes only: run without --quick for a comparison that means something"
        )
    console.print(f"report: {result.report}")
