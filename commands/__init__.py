"""The command-line commands: one module each, thin Typer functions over :mod:`freetumor_cli.core`."""
