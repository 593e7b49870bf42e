"""An interrupted run, by any signal at any moment, reruns to the result of an uninterrupted one, with no
leftovers. Each test starts the command as a user would (a subprocess), sends a signal at a chosen
moment (when a given file appears), runs it again and compares with a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from freetumor_cli.core.io import save_volume
from freetumor_cli.core.outputs import TEMP_PREFIX
from freetumor_cli.core.phantom import Phantom

from .conftest import ctrl_c_as_at_a_terminal, write_phantom_root

pytest.importorskip("torch")
pytest.importorskip("monai")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def freetumor(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "freetumor_cli", *(str(a) for a in args)]


def interrupt_when(cmd: list[str], ready: Callable[[], bool], sig: int, *, timeout: float = 240) -> int:
    """Run ``cmd``, send ``sig`` as soon as ``ready()`` holds, and return its exit code."""
    job = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_at_a_terminal
    )
    deadline = time.time() + timeout
    while job.poll() is None and not ready():
        if time.time() > deadline:
            job.kill()
            raise AssertionError("the moment to interrupt never came")
        time.sleep(0.005)
    assert job.poll() is None, f"the run ended before the moment to interrupt it: {job.stderr.read()[-2000:]}"
    job.send_signal(sig)
    job.wait(timeout=120)
    return job.returncode


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders of unfinished writes anywhere below ``folder``."""
    return [
        p
        for p in folder.rglob("*")
        if p.name.startswith((TEMP_PREFIX, ".tmp-", ".old-")) or p.name.endswith((".part", ".incomplete"))
    ]


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory: pytest.TempPathFactory, small_phantom: Phantom) -> Path:
    root = tmp_path_factory.mktemp("cts")
    for i in range(2):
        save_volume(small_phantom.ct.array, small_phantom.ct, root / "imagesTr" / f"case{i}_0000.nii.gz")
        save_volume(small_phantom.labels.array, small_phantom.ct, root / "labelsTr" / f"case{i}.nii.gz", label=True)
    return root / "imagesTr"


def synthesize_cmd(images: Path, out: Path) -> list[str]:
    return freetumor(
        "synthesize", "--in", images, "--organ", "liver", "--size", "small", "--count", "2", "--copies", "3",
        "--seed", "7", "--out", out, "--preview", "-q",
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(ct_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "whole"
    run(synthesize_cmd(ct_folder, out))
    return out


def same_outputs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith(".")), "different files"
    for name in names:
        if name.endswith(".nii.gz"):
            x, y = nib.load(a / name), nib.load(b / name)
            np.testing.assert_array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj), err_msg=name)
            np.testing.assert_array_equal(x.affine, y.affine)
        elif name.endswith(".json"):
            assert json.loads((a / name).read_text())["tumors"] == json.loads((b / name).read_text())["tumors"]


@pytest.mark.parametrize(
    ("moment", "sig"),
    [
        ("case1_liver_synthetic_002.nii.gz", signal.SIGKILL),  # a copy's CT has landed, not its label or record
        ("case0_liver_synthetic_003.json", signal.SIGKILL),  # between copies: one case done, the next not begun
        ("case1_liver_synthetic_001_label.nii.gz", signal.SIGINT),  # Ctrl-C before the copy's preview and record
        ("case0_liver_synthetic_002_preview.png", signal.SIGTERM),  # the preview written, not the record
    ],
)
def test_an_interrupted_synthesize_batch_finishes_on_rerun(
    ct_folder: Path, uninterrupted: Path, tmp_path: Path, moment: str, sig: int
) -> None:
    out = tmp_path / "cut"
    code = interrupt_when(synthesize_cmd(ct_folder, out), lambda: (out / moment).exists(), sig)
    assert code != 0
    if sig != signal.SIGKILL:
        assert code == 130  # interrupted: finished outputs kept, none half-written
    done = run(synthesize_cmd(ct_folder, out))
    assert "error" not in done.stderr.lower(), done.stderr
    same_outputs(uninterrupted, out)
    assert not leftovers(out), leftovers(out)


def test_a_copy_of_another_configuration_is_still_refused(ct_folder: Path, uninterrupted: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "other"
    shutil.copytree(uninterrupted, out)
    cmd = synthesize_cmd(ct_folder, out)
    cmd[cmd.index("--seed") + 1] = "8"
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 5 and done.stderr.count("another configuration") == 2, done.stderr  # each case refused


def prepare_cmd(root: Path, out: Path) -> list[str]:
    return freetumor("prepare", "--data-root", root, "--out", out, "--folds", "2", "--workers", "1", "-q")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_prepare_killed_inside_a_store_case_leaves_nothing_behind(tmp_path: Path, sig: int) -> None:
    root = write_phantom_root(tmp_path / "root", labelled=2, organ_only=2)
    whole = tmp_path / "whole"
    run(prepare_cmd(root, whole))
    out = tmp_path / "cut"

    def inside_a_case() -> bool:
        return any(p.name.startswith(".tmp-") for p in (out / "store").glob("pp-*/*/*"))

    interrupt_when(prepare_cmd(root, out), inside_a_case, sig)
    run(prepare_cmd(root, out))
    assert not leftovers(out), leftovers(out)
    for name in ("manifest.jsonl", "datalists/liver_fold0.json"):
        assert (out / name).read_text() == (whole / name).read_text(), name
    stored = sorted(p.relative_to(out) for p in (out / "store").glob("pp-*/*/*/case.json"))
    assert stored == sorted(p.relative_to(whole) for p in (whole / "store").glob("pp-*/*/*/case.json"))


def test_a_command_run_in_process_gives_back_the_sigterm_handler() -> None:
    """A command makes SIGTERM stop it as Ctrl-C does only while it runs: a program that runs one in its own
    process (a test, a notebook) keeps its handler, and a pool it forks later still ends its workers."""
    from typer.testing import CliRunner

    from freetumor_cli.app import app

    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["synthesize", "--in", "/nonexistent/ct.nii.gz", "--organ", "liver"])
    assert result.exit_code != 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_interrupt_a_destructor_dropped_still_ends_the_command_with_130() -> None:
    """Python runs a signal handler wherever the main thread is; inside a destructor its KeyboardInterrupt
    is printed and dropped, and the command would go on to exit 0 as if it had not been interrupted."""
    import os

    import typer

    from freetumor_cli.commands._common import report_errors

    class Closes:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):  # the handler runs here, inside the destructor
                pass

    @report_errors
    def command() -> str:
        Closes()
        return "finished"

    ours = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, not as in `pytest &`
    try:
        with pytest.raises(typer.Exit) as stopped:
            command()
        assert stopped.value.exit_code == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    finally:
        signal.signal(signal.SIGINT, ours)
