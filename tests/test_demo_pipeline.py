"""The whole-pipeline demo: a shrunken world end to end (unmarked), and ``freetumor demo --quick`` (slow)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.io import load_volume

pytest.importorskip("torch")
pytest.importorskip("monai")

from freetumor_cli.core.demo import (
    COMPARISON_COLUMNS,
    DEMO_ARMS,
    MODELS,
    DemoConfig,
    comparison_markdown,
    run_demo,
)
from freetumor_cli.core.fair import label

TINY_WORLD = replace(
    DemoConfig.preset(quick=True),
    labelled_cases=3,
    organ_only_cases=3,
    test_cases=2,
    shape=(64, 60, 40),
    spacing_mm=(4.0, 4.0, 4.0),
    model="unet-tiny",
    baseline_steps=2,
    arm_steps=2,
    synth_steps=2,
    audit_cases=1,
    workers=0,
)


def test_demo_runs_every_stage_on_a_tiny_world(tmp_path: Path) -> None:
    steps: list[str] = []
    result = run_demo(tmp_path / "demo", TINY_WORLD, on_step=steps.append)
    out = result.out_dir
    # Every stage ran, in order, and said where its outputs are.
    stages = ["phantom world", "prepare", "baseline", "generator", "arm A ", "arm A′", "arm B", "arm C ", "arm C′"]
    stages += ["arm D"]
    stages += ["baseline on the test set", "quality-control audit", "synthesize", "synthesize"]
    assert len(steps) == len(stages)
    for message, stage in zip(steps, stages, strict=True):
        assert stage in message and str(out) in message
    # The data root went through prepare; the test set is not in it.
    assert (out / "prepared" / "datalists" / "liver_fold0.json").is_file()
    assert not list((out / "data").rglob("test_*"))
    # Checkpoints of the baseline and the four arms; every arm started from the baseline.
    for run in MODELS:
        assert (out / "runs" / run / "checkpoints" / "last" / "model.safetensors").is_file()
    assert (out / "runs" / "generator" / "checkpoints" / "last" / "generator.safetensors").is_file()
    for arm in DEMO_ARMS:
        assert "runs/baseline/checkpoints/last" in (out / "runs" / arm / "config.yaml").read_text().replace("\\", "/")
    assert "runs/generator/checkpoints/last" in (out / "runs" / "D" / "config.yaml").read_text().replace("\\", "/")
    for engine in ("rules", "generator"):
        meta = json.loads((out / "synthetic" / engine / "demo_liver_synthetic.json").read_text())
        assert meta["engine"] == engine
        assert (out / "synthetic" / engine / "demo_liver_synthetic_preview.png").is_file()
    # Predictions keep the test CTs' geometry; both models are scored and compared.
    for i in range(TINY_WORLD.test_cases):
        ct = load_volume(out / "test" / "imagesTs" / f"test_{i:03d}_0000.nii.gz")
        pred = load_volume(out / "eval" / "baseline" / "predictions" / f"test_{i:03d}.nii.gz")
        assert pred.shape == ct.shape
        np.testing.assert_allclose(pred.affine, ct.affine)
    assert set(result.comparison) == set(MODELS)
    for name in MODELS:
        summary = json.loads((out / "eval" / name / "summary.json").read_text())
        assert summary["cases"] == TINY_WORLD.test_cases
        gt_lesions = summary["classes"]["liver_tumor"]["lesions"]["gt"]
        assert gt_lesions >= TINY_WORLD.test_cases  # phantom-recipe tumors are in every test CT
        assert set(result.comparison[name]) == set(COMPARISON_COLUMNS)
    report = result.report.read_text() if result.report else ""
    assert all(f"| {label(name)} |" in report for name in MODELS) and "phantom world" in report.lower()
    for row in ("A′ - A", "B - A′", "C - B", "D - C", "C′ - C", "D - C′", "D - A"):
        assert f"| {row} |" in report, row
    assert "95 % CI" in report and "Tumor contrast" in report
    assert (out / "paired_differences.png").is_file()
    assert result.qc_acceptance["C"] is not None and result.qc_acceptance["B"] is None
    for link in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / link).is_file(), link
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["comparison"] == json.loads(json.dumps(result.comparison))
    # A second run re-creates its folders.
    again = run_demo(tmp_path / "demo", TINY_WORLD)
    assert again.report is not None and again.report.is_file()


def test_comparison_table_formats_missing_values() -> None:
    table = comparison_markdown({"baseline": dict.fromkeys(COMPARISON_COLUMNS, None)})
    assert "| baseline | n/a | n/a | n/a | n/a |" in table


def test_demo_refuses_a_file_as_out(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(target)])
    assert result.exit_code != 0
    assert "is a file" in result.output and "Traceback" not in result.output
    assert target.read_text() == "not a folder"


@pytest.mark.slow
def test_demo_quick_command_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "D - A" in result.output
    assert (tmp_path / "demo" / "report.md").is_file()
