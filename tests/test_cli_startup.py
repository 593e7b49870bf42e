"""``freetumor --help`` and ``--version`` answer without importing torch, MONAI or the numeric stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

from freetumor_cli import __version__

PROBE = """
import sys
from freetumor_cli.app import app
try:
    app({args!r})
except SystemExit:
    pass
heavy = [m for m in ("torch", "monai", "scipy", "nibabel", "matplotlib") if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["synthesize", "--help"],
        ["evaluate", "--help"],
        ["fetch-labels", "--help"],
        ["prepare", "--help"],
        ["train-seg", "--help"],
        ["train-synth", "--help"],
        ["demo", "--help"],
        ["nnunet", "--help"],
        ["nnunet", "dataset", "--help"],
    ],
)
def test_help_and_version_do_not_import_heavy_modules(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("HEAVY:"), out


def test_version_and_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "freetumor_cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"freetumor {__version__}"
