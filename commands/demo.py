"""``freetumor demo``: the built-in example, no data and no network needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from freetumor_cli.commands._common import SeedOption, console, report_errors


@report_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (its demo files are re-created on every run).")
    ] = Path("freetumor_demo"),
    seed: SeedOption = None,
) -> None:
    """Run freetumor on a built-in phantom CT: a synthetic tumor in the liver, pancreas and kidney.

    Example: freetumor demo --out freetumor_demo
    """
    from rich.table import Table

    from freetumor_cli.core.demo import run_demo

    result = run_demo(out, seed=seed or 0, on_step=lambda message: console.print(f"[bold]>[/] {message}"))
    table = Table(title="synthetic tumors", show_lines=False)
    for column in ("organ", "size", "radii (mm)", "volume (ml)", "mean HU change", "outputs"):
        table.add_column(column)
    for organ, case_result in result.results.items():
        for tumor in case_result.tumors[0]:
            table.add_row(
                organ,
                tumor.size_class,
                " x ".join(f"{r:.0f}" for r in tumor.radii_mm),
                f"{tumor.volume_ml:.1f}",
                f"{tumor.mean_hu_change:+.0f}",
                str(case_result.outputs[0].parent),
            )
    console.print(table)
    console.print(f"phantom CT: {result.phantom_image}")
    console.print(f"phantom labels: {result.phantom_labels}")
    console.print(f"previews: {result.out_dir / 'synthetic'}/<organ>/phantom_synthetic_preview.png")
