"""Shared fixtures: small phantoms written to tmp_path, the shared real CT case, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.core.io import Volume, save_volume
from freetumor_cli.core.phantom import Phantom, make_phantom

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOTALSEG_CASE = SHARED_DATA / "totalseg_abdomen"


@pytest.fixture(scope="session")
def small_phantom() -> Phantom:
    """A 4 mm phantom: small enough for fast tests, large enough for every organ."""
    return make_phantom((72, 64, 48), (4.0, 4.0, 4.0), seed=3)


@pytest.fixture
def phantom_files(tmp_path: Path, small_phantom: Phantom) -> tuple[Path, Path]:
    """The small phantom as an nnU-Net-style pair: imagesTr/case_0000.nii.gz, labelsTr/case.nii.gz."""
    image = save_volume(small_phantom.ct.array, small_phantom.ct, tmp_path / "data" / "imagesTr" / "case_0000.nii.gz")
    labels = save_volume(
        small_phantom.labels.array, small_phantom.ct, tmp_path / "data" / "labelsTr" / "case.nii.gz", label=True
    )
    return image, labels


@pytest.fixture(scope="session")
def totalseg_case() -> Path:
    if not (TOTALSEG_CASE / "ct.nii.gz").is_file():
        pytest.skip(f"shared real CT case not found at {TOTALSEG_CASE}")
    return TOTALSEG_CASE


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def oblique_affine(spacing: tuple[float, float, float] = (0.7, 0.9, 5.0)) -> np.ndarray:
    """A rotated, anisotropic, translated affine (not a permutation of the axes)."""
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = [-123.4, 56.7, -890.1]
    return affine


def flat(output: str) -> str:
    """Command output as one line: the frame and line breaks of rich's error boxes removed."""
    for char in "│╭╮╰╯─":
        output = output.replace(char, " ")
    return " ".join(output.split())


def volume(array: np.ndarray, affine: np.ndarray | None = None) -> Volume:
    return Volume(array, np.eye(4) if affine is None else affine)
