"""``freetumor evaluate`` through the CLI: outputs, conventions and bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.io import Volume, save_volume


def write(folder: Path, name: str, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    ref = Volume(np.zeros(array.shape, np.int16), np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    return save_volume(array.astype(np.uint8), ref, folder / name, label=True)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    shape = (20, 20, 10)
    a = np.zeros(shape, np.uint8)
    a[2:15, 2:15, 1:8] = 1  # liver
    a[4:8, 4:8, 2:5] = 2  # liver tumor, 48 voxels
    pa = a.copy()
    pa[4:8, 4:8, 2:4] = 2
    pa[4:8, 4:8, 4] = 1  # prediction: 32 of the 48 voxels
    b = np.zeros(shape, np.uint8)
    b[2:15, 2:15, 1:8] = 1  # a tumor-free case
    pb = b.copy()
    pb[10:12, 10:12, 3] = 2  # with a false positive
    write(gt_dir, "a.nii.gz", a)
    write(gt_dir, "b.nii.gz", b)
    write(pred_dir, "a_0000.nii.gz", pa)
    write(pred_dir, "b.nii.gz", pb)
    return pred_dir, gt_dir


def run(*args: str | Path) -> object:
    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def test_outputs_and_values(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    out = tmp_path / "out"
    result = run("--pred", pred, "--gt", gt, "--out", out, "--classes", "liver_tumor")
    assert result.exit_code == 0, result.output
    for name in (
        "metrics_per_case.csv",
        "metrics_per_lesion.csv",
        "summary.json",
        "summary.md",
        "dice_per_class.png",
        "sensitivity_by_size.png",
        "false_positives_per_case.png",
    ):
        assert (out / name).is_file(), name
    rows = {r["case"]: r for r in csv.DictReader((out / "metrics_per_case.csv").open())}
    assert float(rows["a"]["dice"]) == pytest.approx(2 * 32 / (48 + 32))
    assert rows["b"]["dice"] == "nan" and float(rows["b"]["dice_empty_as_one"]) == 0.0
    assert rows["b"]["hd95_mm"] == "inf"
    summary = json.loads((out / "summary.json").read_text())
    les = summary["classes"]["liver_tumor"]["lesions"]
    assert (les["gt"], les["tp"], les["fp"], les["fp_per_case"]) == (1, 1, 1, 0.5)
    assert les["sensitivity"] == 1.0 and les["precision"] == 0.5 and les["specificity"] == 0.0
    assert summary["classes"]["liver_tumor"]["dice"]["n"] == 1  # tumor-free case excluded
    assert summary["classes"]["liver_tumor"]["hd95_mm"]["infinite"] == 1
    lesion_rows = list(csv.DictReader((out / "metrics_per_lesion.csv").open()))
    assert {r["source"] for r in lesion_rows} == {"gt", "pred"}
    assert "liver_tumor" in (out / "summary.md").read_text()


def test_csv_headers_and_printed_table_come_from_the_metric_specs(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from freetumor_cli.core.evaluate import CASE_COLUMNS, LESION_COLUMNS, METRICS

    pred, gt = folders
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out)], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 0, result.output
    assert (out / "metrics_per_case.csv").read_text().splitlines()[0] == ",".join(CASE_COLUMNS)
    assert (out / "metrics_per_lesion.csv").read_text().splitlines()[0] == ",".join(LESION_COLUMNS)
    printed = next(line for line in result.output.splitlines() if "class" in line)
    assert [cell.strip() for cell in printed.strip("┃ ").split("┃")] == ["class", *(m.cli for m in METRICS if m.cli)]
    markdown = (out / "summary.md").read_text()
    assert "| class | " + " | ".join(m.heading for m in METRICS if m.heading) + " |" in markdown


def test_organ_classes_by_value_and_task_scheme(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    result = run("--pred", pred, "--gt", gt, "--out", tmp_path / "o", "--classes", "1", "--classes", "liver_tumor")
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "o" / "summary.json").read_text())["classes"]) == {"liver", "liver_tumor"}
    result = run("--pred", pred, "--gt", gt, "--out", tmp_path / "t", "--label-space", "task")
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "t" / "summary.json").read_text())["classes"]) == {"tumor"}


def test_missing_prediction_scored_empty_or_skipped(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    (pred / "a_0000.nii.gz").unlink()
    result = run("--pred", pred, "--gt", gt, "--out", tmp_path / "o")
    assert result.exit_code == 0
    assert "without a prediction" in result.output and "scored as empty" in result.output
    rows = {
        r["case"]: r
        for r in csv.DictReader((tmp_path / "o" / "metrics_per_case.csv").open())
        if r["class"] == "liver_tumor"
    }
    assert float(rows["a"]["dice"]) == 0.0 and rows["a"]["prediction_missing"] == "True"
    result = run("--pred", pred, "--gt", gt, "--out", tmp_path / "s", "--skip-missing")
    assert result.exit_code == 0
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["cases"] == 1


def test_values_outside_scheme_fail_naming_the_case(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    bad = np.zeros((20, 20, 10), np.uint8)
    bad[0, 0, 0] = 9
    write(pred, "a_0000.nii.gz", bad)
    result = run("--pred", pred, "--gt", gt, "--out", tmp_path / "o")
    assert result.exit_code != 0
    assert "case a" in result.output and "outside the scheme" in result.output and "Traceback" not in result.output


def test_grid_mismatch_fails_or_resamples(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    a = np.asanyarray(nib.load(pred / "a_0000.nii.gz").dataobj)
    # The same content on a grid twice as fine along axis 0.
    fine = np.repeat(a, 2, axis=0)
    write(pred, "a_0000.nii.gz", fine, np.diag([0.5, 1.0, 2.0, 1.0]))
    result = run("--pred", pred, "--gt", gt, "--out", tmp_path / "o")
    assert result.exit_code != 0 and "case a" in result.output and "--resample-pred" in result.output
    result = run("--pred", pred, "--gt", gt, "--out", tmp_path / "r", "--resample-pred", "--classes", "liver_tumor")
    assert result.exit_code == 0, result.output
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "r" / "metrics_per_case.csv").open())}
    assert float(rows["a"]["dice"]) > 0.7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classes", "spleen"], "unknown class"),
        (["--tolerance-mm", "-1"], "tolerance_mm"),
    ],
)
def test_bad_options(folders: tuple[Path, Path], tmp_path: Path, args: list[str], message: str) -> None:
    pred, gt = folders
    result = run("--pred", pred, "--gt", gt, "--out", tmp_path / "o", *args)
    assert result.exit_code != 0 and message in result.output


def test_no_matching_cases_and_missing_folders(folders: tuple[Path, Path], tmp_path: Path) -> None:
    _, gt = folders
    empty = tmp_path / "other"
    empty.mkdir()
    write(empty, "zzz.nii.gz", np.zeros((20, 20, 10), np.uint8))
    result = run("--pred", empty, "--gt", gt)
    assert result.exit_code != 0 and "matches a ground-truth case" in result.output
    result = run("--pred", tmp_path / "nope", "--gt", gt)
    assert result.exit_code != 0 and "not found" in result.output


def test_datalist_ground_truth_and_workers(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, _ = folders
    datalist = tmp_path / "list.json"
    datalist.write_text(
        json.dumps(
            {
                "validation": [
                    {"image": "img/a_0000.nii.gz", "label": "gt/a.nii.gz"},
                    {"image": "img/b_0000.nii.gz", "label": "gt/b.nii.gz"},
                ]
            }
        )
    )
    result = run("--pred", pred, "--gt", datalist, "--out", tmp_path / "o", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["cases"] == 2
