"""The ``freetumor`` Typer app: registers the commands, nothing else.

Commands import torch, MONAI and the numeric stack inside their functions, so ``freetumor --help``
and ``freetumor --version`` answer instantly.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperOption

from freetumor_cli import __version__
from freetumor_cli.commands._common import OneLineUsageErrors
from freetumor_cli.commands.demo import demo
from freetumor_cli.commands.evaluate import evaluate
from freetumor_cli.commands.fetch_labels import fetch_labels
from freetumor_cli.commands.fetch_weights import fetch_weights
from freetumor_cli.commands.nnunet import nnunet_app
from freetumor_cli.commands.prepare import prepare
from freetumor_cli.commands.synthesize import synthesize
from freetumor_cli.commands.train_seg import train_seg
from freetumor_cli.commands.train_synth import train_synth


def _flag_takes_no_value(display_type_rich: Any) -> Any:
    """Help shows no ``<bool>`` type beside an on/off flag: it takes no value (``--preview``, not
    ``--preview true``)."""

    def shown(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_bool_flag", False) else display_type_rich(self, ctx)

    return shown


TyperOption.display_type_rich = _flag_takes_no_value(TyperOption.display_type_rich)  # type: ignore[method-assign]

app = typer.Typer(
    name="freetumor",
    cls=OneLineUsageErrors,
    help="Synthesize realistic tumors into CT scans and train tumor segmentation on real plus synthetic tumors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"freetumor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """freetumor: realistic synthetic tumors for CT, and segmentation models trained with them."""


app.command("fetch-labels")(fetch_labels)
app.command("fetch-weights")(fetch_weights)
app.command("prepare")(prepare)
app.command("synthesize")(synthesize)
app.command("train-seg")(train_seg)
app.command("train-synth")(train_synth)
app.command("evaluate")(evaluate)
app.command("demo")(demo)
app.add_typer(nnunet_app, name="nnunet")


def main() -> None:
    """Console-script entry point."""
    app()
