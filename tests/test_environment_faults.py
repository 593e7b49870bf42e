"""A full disk, a read-only place, a name too long: one line that names the cause, exit 4, and nothing
half-written. The disk is a small tmpfs mounted for the test (skipped where mounting is not allowed)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from freetumor_cli.core.errors import EXIT_ENVIRONMENT

from .conftest import phantom_root_of, prepare_phantom_root
from .test_interruptions import leftovers
from .test_reliability import assert_one_line_error, invoke

pytest.importorskip("torch")
pytest.importorskip("monai")


def mount(folder: Path, *options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 200 kB file system: room for a few small files, not for a CT."""
    folder = tmp_path / "disk"
    if sys.platform != "linux" or not mount(folder, "size=200k"):
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    if sys.platform != "linux" or not mount(folder, "size=100k"):
        pytest.skip("cannot mount a tmpfs here")
    (folder / "out").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def one_line(code: int, output: str, *words: str) -> None:
    assert_one_line_error(code, output, EXIT_ENVIRONMENT, *words)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_phantom_root(tmp_path_factory)


def test_synthesize_on_a_full_disk(small_disk: Path, totalseg_case: Path) -> None:
    code, output = invoke("synthesize", "--in", totalseg_case / "ct.nii.gz", "--labels", totalseg_case / "organs.nii.gz", "--label-scheme", "freetumor",
                          "--organ", "liver", "--out", small_disk / "out")  # fmt: skip
    one_line(code, output, "no space left on the device")
    assert not any(small_disk.rglob("*.nii.gz")) and not leftovers(small_disk)  # no copy, whole or half


def test_prepare_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    from .conftest import write_phantom_root

    root = write_phantom_root(tmp_path / "root", labelled=1, organ_only=1)
    code, output = invoke("prepare", "--data-root", root, "--out", small_disk / "prepared")
    one_line(code, output, "no space left on the device")
    assert not leftovers(small_disk)


def test_train_seg_on_a_full_disk(small_disk: Path, prepared: Path) -> None:
    code, output = invoke("train-seg", "--data", prepared, "--out", small_disk / "run", "--model", "unet-tiny",
                          "--workers", "0", "--set", "roi=[32,32,32]", "--set", "spacing_mm=[4,4,4]", "--max-steps", "2",
                          "--set", "save_every_steps=1")  # fmt: skip
    one_line(code, output, "no space left on the device")
    assert not leftovers(small_disk) and not (small_disk / "run" / "state.next").exists()


def test_read_only_outputs(read_only: Path, prepared: Path, totalseg_case: Path, tmp_path: Path) -> None:
    code, output = invoke("synthesize", "--in", totalseg_case / "ct.nii.gz", "--labels", totalseg_case / "organs.nii.gz", "--label-scheme", "freetumor",
                          "--organ", "liver", "--out", read_only / "out")  # fmt: skip
    one_line(code, output, "read-only")
    code, output = invoke("train-seg", "--data", prepared, "--out", read_only / "out" / "run", "--model", "unet-tiny")
    one_line(code, output, "read-only")
    root = phantom_root_of(prepared)
    code, output = invoke("prepare", "--data-root", root, "--out", tmp_path / "p", "--store-dir", read_only / "out")
    one_line(code, output, "case store", "read-only")


def test_a_name_too_long_for_the_file_system(totalseg_case: Path, tmp_path: Path) -> None:
    image = tmp_path / ("c" * 235 + ".nii.gz")
    image.write_bytes((totalseg_case / "ct.nii.gz").read_bytes())
    code, output = invoke("synthesize", "--in", image, "--labels", totalseg_case / "organs.nii.gz", "--label-scheme", "freetumor", "--organ", "liver",
                          "--out", tmp_path / "out")  # fmt: skip
    one_line(code, output, "file name is too long", "shorter")
    assert not (tmp_path / "out").exists()
