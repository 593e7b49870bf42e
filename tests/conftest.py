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


def prepare_phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom data root prepared at the tests' 4 mm grid (fold 0: two liver cases train, one validates)."""
    from freetumor_cli.core.prepare import PrepareConfig, prepare
    from freetumor_cli.core.preprocess import PreprocessConfig

    root = write_phantom_root(tmp_path_factory.mktemp("root"))
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(
        root, out, PrepareConfig(folds=2, seed=1, preprocessing=PreprocessConfig(abdomen_spacing_mm=(4.0, 4.0, 4.0)))
    )
    return out


def phantom_root_of(prepared: Path) -> Path:
    """The data root a prepared folder was prepared from (its first case's image lies at
    ``<root>/<dataset>/imagesTr/<file>``)."""
    import json

    first = json.loads((prepared / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    image = Path(first["image"])
    return (image if image.is_absolute() else (prepared / image)).resolve().parents[2]


def oblique_affine(spacing: tuple[float, float, float] = (0.7, 0.9, 5.0)) -> np.ndarray:
    """A rotated, anisotropic, translated affine (not a permutation of the axes)."""
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = [-123.4, 56.7, -890.1]
    return affine


def write_phantom_root(
    root: Path,
    *,
    organ: str = "liver",
    labelled: int = 3,
    organ_only: int = 3,
    seed: int = 0,
    organ_only_seed: int = 10,
) -> Path:
    """A data root of 4 mm phantoms: ``labelled`` cases with tumors of ``organ`` in their source dataset's
    own label convention (LiTS, MSD pancreas, KiTS23), and ``organ_only`` BTCV-style cases."""
    from freetumor_cli.core.datasets import DATASETS
    from freetumor_cli.core.registry import ORGANS

    target = ORGANS[organ]
    spec = next(d for d in DATASETS.values() if d.role == "tumor" and d.remap and d.remap.get(2) == target.tumor_value)
    to_source = {
        region: source for source, region in spec.remap.items() if region in (target.value, target.tumor_value)
    }
    for i in range(labelled):
        p = make_phantom((64, 60, 40), (4.0, 4.0, 4.0), seed=seed + i, tumors={organ: 2 if organ == "liver" else 1})
        source = np.zeros(p.labels.shape, dtype=np.uint8)
        for region_value, source_value in to_source.items():
            source[p.labels.array == region_value] = source_value
        save_volume(p.ct.array, p.ct, root / spec.name / "imagesTr" / f"{organ}_{i}_0000.nii.gz")
        save_volume(source, p.ct, root / spec.name / "labelsTr" / f"{organ}_{i}.nii.gz", label=True)
    for i in range(organ_only):
        q = make_phantom((64, 60, 40), (4.0, 4.0, 4.0), seed=organ_only_seed + i)
        save_volume(q.ct.array, q.ct, root / "BTCV" / "imagesTr" / f"img000{i}.nii.gz")
        save_volume(q.labels.array, q.ct, root / "BTCV" / "labelsTr" / f"label000{i}.nii.gz", label=True)
    return root


def flat(output: str) -> str:
    """Command output as one line: the frame and line breaks of rich's error boxes removed."""
    for char in "│╭╮╰╯─":
        output = output.replace(char, " ")
    return " ".join(output.split())


def volume(array: np.ndarray, affine: np.ndarray | None = None) -> Volume:
    return Volume(array, np.eye(4) if affine is None else affine)


def ctrl_c_as_at_a_terminal() -> None:
    """A child's ``preexec_fn``: Ctrl-C's default disposition, which Python turns into KeyboardInterrupt.
    A shell starts background jobs (``pytest … &``) with SIGINT ignored, and children inherit that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
