"""What a training run tells its user: when it validates and why not, its log, its metrics, its config."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.prepare import PrepareConfig, prepare
from freetumor_cli.core.preprocess import PreprocessConfig

from .conftest import flat, write_phantom_root

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

TINY = ["--model", "unet-tiny", "--workers", "0", "--set", "roi=[32,32,32]", "--set", "spacing_mm=[4,4,4]"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two liver cases with tumors and two organ-only cases: a data root too small for 5 folds."""
    return write_phantom_root(tmp_path_factory.mktemp("root"), labelled=2, organ_only=2)


def _prepare(root: Path, out: Path, folds: int, seed: int) -> tuple[Path, list[str]]:
    config = PrepareConfig(
        folds=folds, seed=seed, store=False, preprocessing=PreprocessConfig(abdomen_spacing_mm=(4.0, 4.0, 4.0))
    )
    result = prepare(root, out, config)
    return out, result.warnings


def _folds(prepared: Path) -> dict[str, set[int]]:
    """Per fold of the liver lists: which kinds of validation case it holds."""
    kinds: dict[str, set[int]] = {"tumor": set(), "tumor-free": set(), "any": set()}
    for line in (prepared / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        kinds["any"].add(record["fold"])
        kinds["tumor" if record["tumors"] else "tumor-free"].add(record["fold"])
    return kinds


@pytest.fixture(scope="module")
def five_folds(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int, list[str]]:
    """Prepared with 5 folds and a seed that leaves one fold empty and one with tumor-free cases only."""
    for seed in range(40):
        out, warnings = _prepare(small_root, tmp_path_factory.mktemp("p") / "prepared", 5, seed)
        kinds = _folds(out)
        empty = sorted(set(range(5)) - kinds["any"])
        tumor_free = sorted(kinds["tumor-free"] - kinds["tumor"])
        if empty and tumor_free:
            return out, empty[0], tumor_free[0], warnings
    raise AssertionError("no seed gives both kinds of fold")


def test_prepare_warns_of_folds_that_cannot_measure_tumor_dice(
    small_root: Path, five_folds: tuple[Path, int, int, list[str]], tmp_path: Path
) -> None:
    prepared, empty, tumor_free, warnings = five_folds
    liver = next(w for w in warnings if w.startswith("liver:"))
    assert f"{empty}" in liver.split("have no validation case")[0] and "have no validation case" in liver
    assert f"{tumor_free}" in liver.split("validate on tumor-free cases only")[0]
    assert "--folds 2 gives every fold a tumor case" in liver or "more tumor-labelled cases" in liver
    assert "warning: liver:" in (prepared / "prepare_report.md").read_text()
    result = CliRunner().invoke(
        app, ["prepare", "--data-root", str(small_root), "--out", str(tmp_path / "p"), "--no-store", "--folds", "2"]
    )
    assert result.exit_code == 0, result.output
    if "warning: liver" in flat(result.output):  # 2 folds may still leave one without a tumor case
        assert "more tumor-labelled cases are needed" in flat(result.output)


def _train(prepared: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["train-seg", "--data", str(prepared), "--organ", "liver", "--out", str(out), *TINY, *extra]
    )
    return result.exit_code, flat(result.output)


def test_training_says_why_it_cannot_validate(five_folds: tuple[Path, int, int, list[str]], tmp_path: Path) -> None:
    prepared, empty, tumor_free, _ = five_folds
    code, output = _train(prepared, tmp_path / "empty", "--fold", str(empty), "--max-steps", "2")
    assert code == 0, output
    assert f"no validation: fold {empty} of liver has no validation case" in output
    best = json.loads((tmp_path / "empty" / "checkpoints" / "best" / "model.json").read_text())
    assert "has no validation case" in json.dumps(best)
    code, output = _train(
        prepared, tmp_path / "free", "--fold", str(tumor_free), "--set", "epochs=1", "--set", "val_min_steps=1"
    )
    assert code == 0, output
    assert "validation tumor Dice n/a: none of the" in output and "holds a tumor" in output
    best = json.loads((tmp_path / "free" / "checkpoints" / "best" / "model.json").read_text())
    assert "no validation run" not in json.dumps(best) and "holds a tumor" in json.dumps(best)
    rows = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_tumor_dice"] for r in rows if "val_tumor_dice" in r] == [None]  # null, not NaN
    assert "NaN" not in (tmp_path / "free" / "metrics.jsonl").read_text()


def test_short_runs_validate_at_most_every_val_min_steps(
    five_folds: tuple[Path, int, int, list[str]], small_root: Path, tmp_path: Path
) -> None:
    """Epochs of one or two steps (a small data root): validation after every epoch would take most of a
    short run. It waits val_min_steps (10) optimizer steps since the last one; a shorter run says so."""
    prepared, _ = _prepare(small_root, tmp_path / "p2", 2, 0)
    fold = min(json.loads(line)["fold"] for line in (prepared / "manifest.jsonl").read_text().splitlines())
    code, output = _train(prepared, tmp_path / "short", "--fold", str(fold), "--set", "epochs=4")
    assert code == 0, output
    steps = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_tumor_dice" in r for r in steps)
    assert "fewer than val_min_steps (10" in output
    code, output = _train(prepared, tmp_path / "long", "--fold", str(fold), "--set", "epochs=12")
    assert code == 0, output
    rows = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    total = max(r["step"] for r in rows if "loss" in r)
    assert total < 12 * 10, "epochs shorter than val_min_steps (the case this test is about)"
    validated = [r["step"] for r in rows if "val_tumor_dice" in r]
    assert validated and all(b - a >= 10 for a, b in itertools.pairwise([0, *validated])), validated
    assert len(validated) <= total // 10
    log = (tmp_path / "long" / "run.log").read_text()
    assert len(re.findall(r"step \d+: validation tumor \S+ .* on \d+ case\(s\)", log)) == len(validated)


def test_the_run_log_and_metrics_say_what_happened(
    five_folds: tuple[Path, int, int, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared, _, _, _ = five_folds
    args = ["train-seg", "--data", str(prepared), "--organ", "liver", "--out", str(tmp_path / "run"), *TINY]
    args += ["--max-steps", "3", "--set", "warmup_epochs=100"]
    monkeypatch.setattr("sys.argv", ["/somewhere/bin/freetumor", *args])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    log = (tmp_path / "run" / "run.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ", line) for line in log), log
    assert f"started by: freetumor train-seg --data {prepared} --organ liver" in log[0], log[0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "loss" in r]
    assert lrs[0] > 0 and lrs == sorted(lrs), "warm-up from the first step on (the rate each step used)"


def test_a_case_store_that_stops_serving_crops_is_said_once(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Cases whose source files changed after prepare are stale in the store: their crops come from the raw
    files (several times slower). The run's log says so once, naming a case, however many steps follow."""
    import os

    from .conftest import prepare_phantom_root

    prepared = prepare_phantom_root(tmp_path_factory)
    for line in (prepared / "manifest.jsonl").read_text().splitlines():
        image = prepared / json.loads(line)["image"]
        os.utime(image, (image.stat().st_atime, image.stat().st_mtime + 100))  # edited after prepare
    code, output = _train(prepared, tmp_path / "run", "--max-steps", "3")
    assert code == 0, output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["store_share"] for r in rows if "loss" in r] == [0.0, 0.0, 0.0]
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.count("came from raw files, not the case store") == 1, log
    assert re.search(r"step 1: 100% of the crops came from raw files, not the case store \(\S+/\S+ among them\)", log)
