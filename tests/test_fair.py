"""The fair, paired experiment: its statistics, its size bound, and every stage in quick mode."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from freetumor_cli.core.fair import (
    FairConfig,
    bootstrap_ci,
    mcnemar_p,
    run_experiment,
    sizes_for_crop,
    wilcoxon_p,
)


def test_synthetic_sizes_are_bounded_by_the_crop() -> None:
    # 32 voxels of 3 mm: 96 mm, so a tumor at most 48 mm across (radius 24 with the 1.25 jitter).
    assert sizes_for_crop(32, 3.0) == ("tiny", "small")
    assert sizes_for_crop(96, 1.5) == ("tiny", "small", "medium")  # the method's 96³ crop: 144 mm
    assert sizes_for_crop(192, 1.5) == ("tiny", "small", "medium", "large")


def test_paired_statistics() -> None:
    rng = np.random.default_rng(0)
    shifted = [list(rng.normal(0.08, 0.05, 16)) for _ in range(3)]
    low, high = bootstrap_ci(shifted, resamples=2000)
    assert 0.05 < low < 0.08 < high < 0.11
    assert wilcoxon_p([v for g in shifted for v in g]) < 1e-6
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    null = [list(rng.normal(0.0, 0.05, 16)) for _ in range(3)]
    low, high = bootstrap_ci(null, resamples=2000)
    assert low < 0 < high
    # McNemar: 10 lesions found by the first arm only, 1 by the second only.
    first = [True] * 10 + [False] + [True] * 5
    second = [False] * 10 + [True] + [True] * 5
    only_first, only_second, p = mcnemar_p(first, second)
    assert (only_first, only_second) == (10, 1) and p == pytest.approx(0.01172, abs=1e-4)
    assert mcnemar_p([True, False], [True, False])[2] == 1.0


def test_every_stage_runs_in_quick_mode_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from freetumor_cli.core.training import read_metrics

    config = FairConfig.quick()
    said: list[str] = []
    text = run_experiment(tmp_path / "fair", config, step=said.append)
    for row in ("| A′ - A |", "| B - A′ |", "| D - C′ |", "| C′ - C |", "| D - A |", "| E - D |"):
        assert row in text, row
    assert "Quality-control audit" in text and "Tumor contrast" in text and "predicted / true volume" in text
    saved = json.loads((tmp_path / "fair" / "fair_toy.json").read_text())
    seed = saved["seeds"][0]
    assert set(seed["scores"]) == {"A", "Ap", "B", "C", "Cp", "D", "E", "baseline"}
    assert seed["sizes"] == ["tiny", "small"]
    assert seed["qc_acceptance"]["C"] is not None and seed["qc_acceptance"]["B"] is None
    assert seed["qc_acceptance"]["Cp"] is not None and seed["qc_acceptance"]["Ap"] is None
    assert set(seed["audit"]["engines"]) == {"rules", "generator"}
    assert {"real_hu", "rules_hu_contrast", "generator_hu_contrast", "generator_halo"} <= set(seed["contrast"])
    # 12 steps do not learn the tumors: the plateau check on the calibration CTs trains the baseline on for
    # 6 more steps from its weights, and every arm and the generator continue from that second attempt.
    check = seed["baseline"]
    assert [a["steps"] for a in check["attempts"]] == [12, 18] and check["run"] == "baseline_continued_18"
    assert [a["continued_from"] for a in check["attempts"]] == [None, "baseline"]
    assert not check["accepted"] and all(a["calibration_dice"] < config.plateau_dice for a in check["attempts"])
    assert "- seed 0: 12 steps 0.00 (0.00) → 18 steps (12 + 6 continued) 0.00" in text and "**failed**" in text
    assert not [line for line in said if "accepted baseline is now" in line]  # its first check changes nothing
    runs = tmp_path / "fair" / "seed_0" / "runs"
    continued = json.loads((runs / "baseline_continued_18" / "init.json").read_text())
    assert Path(continued["source"]).parents[1].name == "baseline"
    # The continued attempt takes 6 steps of its own, from a seed of its own (which draws its crops), in
    # another order than the first attempt's first 6.
    assert "\nseed: 1000\n" in (runs / "baseline_continued_18" / "config.yaml").read_text()
    samples = {
        name: [row["samples"] for row in read_metrics(runs / name / "metrics.jsonl") if "samples" in row]
        for name in ("baseline", "baseline_continued_18")
    }
    assert len(samples["baseline_continued_18"]) == 6 and samples["baseline_continued_18"] != samples["baseline"][:6]
    assert all(0 <= a["calibration_case_mean"] < 1 for a in check["attempts"])
    for arm in ("A", "D"):
        source = json.loads((runs / arm / "init.json").read_text())["source"]
        assert Path(source) == runs / "baseline_continued_18" / "checkpoints" / "last", source
    # The arms with organ-only crops see the same crops in the same order, under the same LR curve.
    arms = ("A", "Ap", "B", "C", "Cp", "D", "E")
    logs = {arm: [json.loads(line) for line in (runs / arm / "metrics.jsonl").read_text().splitlines()] for arm in arms}
    order = {arm: [(r["samples"], r["lr"]) for r in rows if "samples" in r] for arm, rows in logs.items()}
    assert len(order["B"]) == config.arm_steps and all(order[arm] == order["B"] for arm in ("Ap", "C", "Cp", "D", "E"))
    assert [lr for _, lr in order["A"]] == [lr for _, lr in order["B"]]
    # A′ adds no tumor; the generator trained on the method's mix, labelled cases about half of its samples.
    assert all(r.get("synthetic_crops", 0) == 0 for r in logs["Ap"])
    assert any(r.get("synthetic_crops", 0) > 0 for r in logs["B"])
    # A second run finds every stage done and only recomputes the tables.
    started = time.perf_counter()
    assert run_experiment(tmp_path / "fair", config) == text
    assert time.perf_counter() - started < 30


def test_held_out_crops_come_from_cases_no_stage_trains_on(tmp_path: Path) -> None:
    """The generator is scored on crops of organ-only cases outside every training list; the audit is
    calibrated on labelled CTs outside the data."""

    from freetumor_cli.core.fair import generator_config, heldout_cases, prepared_world

    config = replace(FairConfig.quick(), organ_only_cases=10, test_cases=1, shape=(64, 64, 40))
    world, prepared = prepared_world(tmp_path, config, 0)
    data = json.loads((prepared / "datalists" / "liver_fold0.json").read_text())
    trained = {e["image"] for e in data["training"]}
    heldout = heldout_cases(prepared)
    assert len(heldout) == config.heldout_cases and not trained & set(heldout)
    assert all(e.get("role") != "tumor-labelled" for e in data["validation"])  # labelled cases all train
    assert sum(e.get("role") == "tumor-labelled" for e in data["training"]) == config.labelled_cases
    calibration = sorted((world["calibration"] / "imagesTr").glob("*.nii.gz"))
    assert len(calibration) == config.calibration_cases
    assert not {p.name for p in calibration} & {Path(i).name for i in trained}
    # About half of the generator's samples are labelled cases (the original: LiTS ×200, ~60 %).
    synth = generator_config(config, 0, prepared)
    labelled = config.labelled_cases * (synth.labelled_repeats or 1)
    share = labelled / (labelled + len(trained) - config.labelled_cases)
    assert 0.35 <= share <= 0.65, share


def test_a_folder_of_another_configuration_is_refused(tmp_path: Path) -> None:

    from freetumor_cli.core.errors import OutputExistsError
    from freetumor_cli.core.fair import make_world

    config = replace(FairConfig.quick(), organ_only_cases=1, test_cases=1, labelled_cases=1, shape=(48, 48, 32))
    make_world(tmp_path, config, 0)
    # What runs and how the tables are drawn may change between resumes; the world and the runs may not.
    make_world(tmp_path, replace(config, arms=("A", "E"), seeds=(0, 1), bootstrap=50, workers=0, plateau_dice=0.9), 0)
    with pytest.raises(OutputExistsError, match="baseline_steps"):
        make_world(tmp_path, replace(config, baseline_steps=99), 0)


def test_a_configuration_without_calibration_cts_is_refused() -> None:
    """The calibration CTs check the baseline before the arms start and calibrate the audit."""
    from freetumor_cli.core.errors import ConfigError

    with pytest.raises(ConfigError, match="calibration CTs"):
        replace(FairConfig.quick(), calibration_cases=0)
    with pytest.raises(ConfigError, match="plateau_retries"):
        replace(FairConfig.quick(), plateau_retries=-1)


def test_the_plateau_check_pools_the_calibration_tumors_voxels(tmp_path: Path) -> None:
    """A missed small tumor costs its voxels, not a whole case's Dice."""
    from freetumor_cli.core.evaluate import EvaluateConfig, evaluate, write_reports
    from freetumor_cli.core.fair import LIVER, pooled_dice
    from freetumor_cli.core.io import Volume, save_volume

    grid = Volume(np.zeros((8, 8, 8), np.int16), np.eye(4))
    truth, predicted = np.zeros((2, 8, 8, 8), np.uint8), np.zeros((2, 8, 8, 8), np.uint8)
    truth[0, :2, :5, 0] = LIVER.tumor_value  # 10 voxels, half of them found, 5 false positives
    predicted[0, :1, :5, 0] = predicted[0, 4, :5, 0] = LIVER.tumor_value
    truth[1, 0, 0, :2] = LIVER.tumor_value  # a 2-voxel tumor, missed
    predicted[:, 7, 7, 7] = LIVER.value  # organ voxels count for nothing
    for i in range(2):
        save_volume(truth[i], grid, tmp_path / "labels" / f"calib_{i:03d}.nii.gz", label=True)
        save_volume(predicted[i], grid, tmp_path / "predictions" / f"calib_{i:03d}.nii.gz", label=True)
    # From the evaluation the check runs (its per-case Dice and volumes), as the check reads it.
    cases, scores, _ = evaluate(tmp_path / "predictions", tmp_path / "labels", EvaluateConfig(classes=("liver_tumor",)))
    write_reports(cases, scores, tmp_path / "eval")
    assert pooled_dice(tmp_path / "eval" / "metrics_per_lesion.csv") == pytest.approx(2 * 5 / (10 + 10 + 2), rel=1e-4)
    # (the mean of the cases' Dice would be (0.5 + 0) / 2)


def test_a_change_of_the_accepted_baseline_retrains_what_continued_from_the_other(tmp_path: Path) -> None:
    from freetumor_cli.core.fair import follow_baseline

    out = tmp_path / "seed_0"
    # baseline_3000: an attempt of an earlier version (trained again from scratch), kept as an attempt.
    kept = ("runs/baseline", "runs/baseline_continued_3000", "runs/baseline_3000", "eval/calibration/baseline",
            "eval/calibration/baseline_continued_3000")  # fmt: skip
    downstream = (
        "runs/generator",
        "runs/A",
        "runs/Cp",
        "runs/baseline_continued",
        "eval/A",
        "eval/baseline",
        "qc_audit",
    )
    for stage in (*kept, *downstream):
        (out / stage).mkdir(parents=True)
    (out / "qc_audit" / "qc_audit.json").write_text("{}")
    said: list[str] = []
    follow_baseline(out / "runs", "baseline", said.append)  # the first check: everything is its own
    follow_baseline(out / "runs", "baseline", said.append)
    assert not said and all((out / stage).is_dir() for stage in (*kept, *downstream))
    follow_baseline(out / "runs", "baseline_continued_3000", said.append)
    assert said == [
        "the accepted baseline is now baseline_continued_3000 (it was baseline): its generator and arms are "
        "trained again"
    ]
    assert [stage for stage in (*kept, *downstream) if (out / stage).exists()] == list(kept)
    assert json.loads((out / "runs" / "accepted_baseline.json").read_text()) == {"run": "baseline_continued_3000"}


def test_a_folder_without_the_accepted_baseline_is_judged_by_its_arms(tmp_path: Path) -> None:
    """A folder of an earlier version records no accepted baseline: its arms' init.json says which."""
    from freetumor_cli.core.fair import follow_baseline

    runs = tmp_path / "runs"
    for stage in ("baseline", "baseline_3000", "generator", "A"):
        (runs / stage).mkdir(parents=True)
    source = runs / "baseline_3000" / "checkpoints" / "last"
    (runs / "A" / "init.json").write_text(json.dumps({"source": str(source), "loaded": []}))
    said: list[str] = []
    follow_baseline(runs, "baseline", said.append)
    assert said and "(it was baseline_3000)" in said[0]
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["baseline", "baseline_3000"]


def test_a_continued_attempt_is_not_taken_for_an_arm_of_another_baseline(tmp_path: Path) -> None:
    """A first check whose baseline was continued: the continued attempt's init.json names the first
    attempt, which is no sign that an earlier invocation accepted it."""
    from freetumor_cli.core.fair import follow_baseline

    runs = tmp_path / "runs"
    for stage in ("baseline", "baseline_continued_3000"):
        (runs / stage).mkdir(parents=True)
    source = runs / "baseline" / "checkpoints" / "last"
    (runs / "baseline_continued_3000" / "init.json").write_text(json.dumps({"source": str(source), "loaded": []}))
    said: list[str] = []
    follow_baseline(runs, "baseline_continued_3000", said.append)
    assert not said


def test_a_continued_attempt_starts_from_the_last_with_a_schedule_and_stream_of_its_own(tmp_path: Path) -> None:
    from freetumor_cli.core.fair import baseline_config, baseline_steps

    config = FairConfig()
    first = baseline_config(config, 2)
    more = baseline_config(replace(config, baseline_steps=config.baseline_steps // 2), 2 + 1000, init=tmp_path)
    assert first.init is None and more.init == str(tmp_path)
    assert (first.max_steps, more.max_steps) == (2000, 1000)
    # 10 % warm-up in epochs of one step per labelled case.
    assert more.warmup_epochs * config.labelled_cases == pytest.approx(100)
    assert first.lr == more.lr and first.seed != more.seed
    check = {"attempts": [{"steps": 2000}, {"steps": 3000}]}
    assert baseline_steps(check, 2000) == "2000 steps, then 1000 more from its weights"
    assert baseline_steps({"attempts": [{"steps": 2000}]}, 2000) == baseline_steps({}, 2000) == "2000 steps"


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    from freetumor_cli.core.errors import InputError
    from freetumor_cli.core.fair import run_experiment

    (tmp_path / "out").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        run_experiment(tmp_path / "out", FairConfig.quick())
    assert (tmp_path / "out").read_text() == "x"


def test_pooling_over_no_label_is_an_error(tmp_path: Path) -> None:
    from freetumor_cli.core.errors import InputError
    from freetumor_cli.core.fair import pooled_dice

    header = "case,class,value,prediction_missing,dice,gt_volume_ml,pred_volume_ml\n"
    (tmp_path / "metrics_per_case.csv").write_text(header)
    (tmp_path / "metrics_per_lesion.csv").write_text("case,class,source,index,matched,radius_mm\n")
    with pytest.raises(InputError, match="no label"):
        pooled_dice(tmp_path / "metrics_per_lesion.csv")
