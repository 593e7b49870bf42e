"""Output for people and for pipes: whole tables, one-line usage errors, help that shows what it takes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.io import save_volume
from freetumor_cli.core.phantom import Phantom

from .conftest import flat


def run(*args: object, columns: int = 80) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})
    return result.exit_code, result.stdout, result.stderr


def test_tables_are_whole_in_a_pipe_and_a_narrow_terminal(tmp_path: Path) -> None:
    """fetch-weights --list exists to show the paths to pass: none is cut, however narrow the output."""
    home = tmp_path / ("a_rather_long_folder_name_" * 4) / "home"
    code, out, _ = run("fetch-weights", "--list", "--home", home, columns=40)
    assert code == 0, out
    assert "…" not in out
    for line in out.splitlines():
        if "checkpoints" in line and "│" in line:
            assert str(home / "checkpoints") in line, line  # each path on one line of the table
    assert sum(str(home) in line for line in out.splitlines()) >= 4


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["synthesize", "--in", "ct.nii.gz", "--organ", "liver", "--count", "0"], ["'--count'", "at least 1"]),
        (["synthesize", "--in", "ct.nii.gz", "--organ", "liver", "--count", "many"], ["'--count'", "'auto'"]),
        (["synthesize", "--in", "ct.nii.gz", "--organ", "spleen"], ["'--organ'", "'liver'"]),
        (["synthesize", "--organ", "liver"], ["Missing option '--in'"]),
        (["synthesize", "--bogus"], ["No such option: --bogus"]),
        (["evaluate", "--overlap", "2"], ["'--overlap'"]),
        (["bogus"], ["No such command 'bogus'", "freetumor --help lists the commands"]),
    ],
)
def test_usage_errors_are_one_line_naming_the_option(args: list[str], names: list[str]) -> None:
    code, out, err = run(*args)
    assert code == 2, (out, err)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "╭" not in out + err


def test_help_shows_extras_and_choices() -> None:
    _, synthesize, _ = run("synthesize", "--help", columns=250)
    assert "freetumor[dicom]" in synthesize
    for choices in ("<rules|generator>", "<N|auto>", "<auto|cpu|cuda|cuda:N>"):
        assert choices in synthesize, choices
    _, train_seg, _ = run("train-seg", "--help", columns=250)
    for choices in ("<swinunetr|unet|unet-tiny>", "<no|fp16|bf16>", "<rules|PATH>"):
        assert choices in train_seg, choices
    for command in ("synthesize", "train-seg", "train-synth", "evaluate", "prepare"):
        _, text, _ = run(command, "--help", columns=250)
        assert "<str>" not in text and "list[str]" not in text, command


def test_batch_notes_name_the_case_and_the_copy(small_phantom: Phantom, tmp_path: Path) -> None:
    images, labels = tmp_path / "imgs", tmp_path / "labs"
    for name in ("p1", "p2"):
        save_volume(small_phantom.ct.array, small_phantom.ct, images / f"{name}_0000.nii.gz")
        save_volume(small_phantom.labels.array, small_phantom.ct, labels / f"{name}.nii.gz", label=True)
    code, out, err = run(
        "synthesize", "--in", images, "--labels", labels, "--organ", "liver", "--size", "small", "--count", "20",
        "--copies", "2", "--set", "rules.max_tumor_share=0.05", "-o", tmp_path / "o", columns=250,
    )  # fmt: skip
    assert code == 0, out + err
    placed = [line for line in out.splitlines() if "placed" in line and "tumors: the next would" in line]
    assert placed, out
    for line in placed:
        assert line.startswith(("p1 cop", "p2 cop")), line
    for name in ("p1 copy 1:", "p1 copy 2:", "p2 copy 1:", "p2 copy 2:"):
        assert any(line.startswith(name) and "liver tumor(s)" in line for line in out.splitlines()), name


def test_each_flag_means_one_thing(tmp_path: Path) -> None:
    """--label-scheme says how organ masks are encoded (synthesize, prepare); evaluate's label space is
    --label-space; --dataset without --layout nnunet is refused instead of ignored."""
    code, out, err = run("evaluate", "--pred", tmp_path, "--gt", tmp_path, "--label-scheme", "task")
    assert code == 2 and "--label-space" in out + err, out + err
    _, help_text, _ = run("evaluate", "--help", columns=250)
    assert "--label-space" in help_text and "<abdomen|chest|task>" in help_text
    code, out, err = run("synthesize", "--in", tmp_path, "--organ", "liver", "--dataset", "Dataset502_Mine")
    assert code == 2 and "--layout nnunet" in out + err, out + err
    _, help_text, _ = run("synthesize", "--help", columns=250)
    assert "with --count auto, one class per output" in flat(help_text)
