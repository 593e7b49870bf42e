"""A fair, paired experiment: what synthetic tumors, quality control and the generator each add.

Per seed, a phantom world of its own (labelled CTs with "real" tumors drawn by the phantom's recipe,
organ-only CTs, and a held-out test set fixed before any training), then:

1. one baseline (labelled cases only, warm-up, CutMix), trained to a plateau;
2. one generator (train-synth, the baseline as critic);
3. arms that all continue from the baseline (``init``) for the same number of steps, seed and learning
   rate: A labelled only; A′ labelled plus organ-only crops, no synthesis; B + rule-based tumors;
   C + rule-based tumors with quality control; C′ as C with the rules' HU change scaled to the
   generator's measured contrast; D + generator tumors with quality control (the method); E + generator
   tumors without it. Arms A′-E see the same crops in the same order and (B-E) the same tumor geometry
   in every crop: they differ only in what the arm names;
4. every arm and the baseline scored on the test set (per case, per lesion, predicted against true volume);
5. a quality-control audit: the baseline's tumor recall on real tumors of labelled CTs no stage trained
   on (which calibrates a threshold that passes 90 % of them) and on synthetic tumors of both engines.

The generator trains as the method trains it, scaled down: the labelled cases repeated so that about half
of its samples hold a real tumor, its steps and learning rate chosen on a development world
(``benchmarks/fair_plateau.py --generator``), scored on held-out crops of organ-only cases that no stage
trains on, and the last checkpoint used (a rule fixed before any test result). Its HU contrast and halo
on those crops are logged beside the rules' and the real tumors' contrast.

The paired statistics (:func:`paired_table`) pool the test cases of all seeds: per comparison, the mean
per-case Dice difference with a 95 % bootstrap interval (cases resampled within seeds) and a Wilcoxon
signed-rank p, each seed's own mean difference and how many seeds agree in sign (each arm is one trained
model per seed, which the case-level tests do not model), and lesion detection with an exact McNemar
test, overall and for early (<= 10 mm) lesions. Each stage is skipped when its result exists, so an
interrupted run resumes per arm.

Synthetic tumor sizes are bounded by the crop, not by the test set: a crop of ``roi`` voxels of
``spacing_mm`` holds a tumor whose diameter is at most half its side, so only size classes whose
largest radius (base × 1.25) fits that are drawn (:func:`sizes_for_crop`).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli.core.errors import ConfigError, InputError, OutputExistsError
from freetumor_cli.core.io import load_volume, save_volume
from freetumor_cli.core.outputs import writable_folder, write_text_atomic
from freetumor_cli.core.registry import ORGANS
from freetumor_cli.core.synthesis_config import SIZE_CLASSES, SynthesisConfig

LIVER = ORGANS["liver"]
ARMS: dict[str, str] = {
    "A": "labelled only",
    "Ap": "+ organ-only crops, no synthesis",
    "B": "+ rule-based tumors, no QC",
    "C": "+ rule-based tumors, QC",
    "Cp": "+ rule-based tumors at the generator's contrast, QC",
    "D": "+ generator tumors, QC (the method)",
    "E": "+ generator tumors, no QC",
}
# How the tables name an arm (the folders and --arms use the keys).
ARM_LABELS = {"Ap": "A′", "Cp": "C′"}
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("Ap", "A"), ("B", "Ap"), ("B", "A"), ("C", "B"), ("D", "C"), ("Cp", "C"), ("D", "Cp"), ("D", "A"), ("E", "D"),
)  # fmt: skip
EARLY_RADIUS_MM = 10.0


def label(arm: str) -> str:
    """An arm's name in the tables (A′ for ``Ap``)."""
    return ARM_LABELS.get(arm, arm)


# The generator's steps and learning rate, chosen by `benchmarks/fair_plateau.py --generator` on the
# development world (seed 99, never reported) by arm D's development tumor Dice, as the baseline's steps
# were: of 150 and 300 steps at 1e-4 (the method's rate) and 1e-3, 300 steps at 1e-3 scored highest
# (0.639, against 0.628-0.636; arm C 0.693). 300 steps are about 12 passes over its 5 × 10 labelled and
# 48 organ-only samples.
SYNTH_STEPS = 300
SYNTH_LR = 1e-3
# The baseline's plateau check: its tumor Dice pooled over the calibration CTs (labelled, never trained
# on). A mean of the CTs' Dice was the first measure: with one to three tumors a CT, it measured whether a
# CT's small tumor was found, and failed seed 1's baseline at 2000 and 3000 steps (0.37, 0.33). The floor
# follows a rule written before the pooled curve was measured: the midpoint of the development world's
# pooled calibration Dice at 1000 steps (0.645) and 2000 (0.807; 0.000 at 500), rounded down to a
# multiple of 0.05.
PLATEAU_DICE = 0.7


@dataclass(frozen=True)
class FairConfig:
    """The experiment's size; :meth:`quick` runs every stage in a few minutes on 2 CPU cores.

    Attributes:
        seeds: one phantom world and one set of runs per seed.
        labelled_cases, organ_only_cases, test_cases: the world (test CTs hold ``test_tumors`` each).
        calibration_cases: labelled CTs outside the data that calibrate the quality-control audit.
        heldout_cases: organ-only CTs in the data that no stage trains on: the generator's held-out crops
            (one each) come from them.
        shape, spacing_mm, tumor_radius_mm: the phantoms and their "real" tumors' radii.
        roi: the crop side in voxels (also what bounds the synthetic sizes).
        model: the segmentation network of every run.
        baseline_steps, arm_steps, synth_steps: optimizer steps of the baseline, of each arm, of the generator.
        plateau_dice, plateau_retries: the baseline's check before any arm starts (:func:`trained_baseline`):
            it is accepted when its pooled tumor Dice on the calibration CTs is at least ``plateau_dice``;
            otherwise training continues from the last attempt's weights for ``baseline_steps // 2`` more
            steps, at most ``plateau_retries`` times.
        lr, arm_lr, synth_lr: learning rates of the baseline, of the arms (which continue from it), of the
            generator (and its discriminator).
        generator_tumor_share: the share of the generator's samples drawn from labelled cases (real tumors).
        arms: which arms run.
        audit_cases: organ-only CTs per engine in the quality-control audit.
        bootstrap: bootstrap resamples for the intervals.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    labelled_cases: int = 5
    organ_only_cases: int = 48
    test_cases: int = 16
    test_tumors: int = 3
    calibration_cases: int = 5
    heldout_cases: int = 16
    shape: tuple[int, int, int] = (104, 104, 64)
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    tumor_radius_mm: tuple[float, float] = (5.0, 20.0)
    roi: int = 32
    model: str = "unet"
    baseline_steps: int = 2000
    plateau_dice: float = PLATEAU_DICE
    plateau_retries: int = 1
    arm_steps: int = 200
    synth_steps: int = SYNTH_STEPS
    generator_channels: int = 8
    lr: float = 1e-3
    arm_lr: float = 5e-4
    synth_lr: float = SYNTH_LR
    generator_tumor_share: float = 0.5
    arms: tuple[str, ...] = tuple(ARMS)
    audit_cases: int = 16
    bootstrap: int = 2000
    workers: int = 1

    def __post_init__(self) -> None:
        if self.calibration_cases < 1:
            raise ConfigError(
                "the paired experiment needs calibration CTs: they check the baseline and calibrate the audit",
                hint="set calibration_cases to 1 or more (5 by default)",
            )
        if self.plateau_retries < 0:
            raise ConfigError(f"plateau_retries is {self.plateau_retries}", hint="use 0 (check only) or more")

    @classmethod
    def quick(cls) -> FairConfig:
        """Every stage, tiny: minutes on 2 CPU cores; its figures mean nothing."""
        return cls(
            seeds=(0,), organ_only_cases=4, test_cases=3, calibration_cases=2, heldout_cases=2, baseline_steps=12, arm_steps=6,
            synth_steps=4, generator_channels=4, audit_cases=2, bootstrap=200,
        )  # fmt: skip


def sizes_for_crop(roi: int, spacing_mm: float, config: SynthesisConfig | None = None) -> tuple[str, ...]:
    """The size classes a crop of ``roi`` voxels of ``spacing_mm`` holds: largest diameter <= half its side."""
    config = config or SynthesisConfig()
    limit = roi * spacing_mm / 4  # the largest radius
    return tuple(n for n in SIZE_CLASSES if config.size_class(n).radius_mm * config.radius_jitter[1] <= limit)


def _liver_only(labels: np.ndarray) -> np.ndarray:
    keep = np.isin(labels, [LIVER.value, LIVER.tumor_value])
    return np.where(keep, labels, 0).astype(np.uint8)


# Settings a resumed folder may change: which seeds and arms run, the tables' resamples, the loaders, and
# the baseline check's floor and retries (a change of the accepted baseline removes what continued from
# the other one: :func:`follow_baseline`).
_NOT_RESULTS = ("seeds", "arms", "bootstrap", "workers", "plateau_dice", "plateau_retries")


def _shaping(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape a seed's results, in their JSON form (lists, not tuples)."""
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in _NOT_RESULTS}


def make_world(out: Path, config: FairConfig, seed: int) -> dict[str, Path]:
    """Write one seed's phantom world: data root, test set and audit CTs. The test set is fixed here,
    before any training, from seeds of its own; the "real" tumors are the phantom's, never the synthesizer's."""
    from freetumor_cli.core.phantom import make_phantom

    marker = out / "world.json"
    paths = {
        "data": out / "data", "test_images": out / "test" / "imagesTs", "test_labels": out / "test" / "labelsTs",
        "calibration": out / "calibration",
    }  # fmt: skip
    if marker.is_file():
        saved = _shaping(json.loads(marker.read_text(encoding="utf-8")).get("config", {}))
        changed = sorted(k for k, v in _shaping(asdict(config)).items() if saved.get(k) != v)
        if changed:
            raise OutputExistsError(
                f"{out} holds a run of another configuration (differs in {', '.join(changed)})",
                hint="choose a new --out, or delete the folder to start over; a run resumes only with its own settings",
            )
        return paths
    for folder in ("data", "test", "calibration"):
        shutil.rmtree(out / folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    base = 10_000 * (seed + 1)

    def phantom(index: int, tumors: int) -> Any:
        return make_phantom(
            config.shape, config.spacing_mm, seed=base + index, tumors={"liver": tumors},
            tumor_radius_mm=config.tumor_radius_mm,
        )  # fmt: skip

    liver = paths["data"] / "Dataset003_Liver"
    for i in range(config.labelled_cases):
        p = phantom(i, int(rng.integers(1, 4)))
        save_volume(p.ct.array, p.ct, liver / "imagesTr" / f"liver_{i:03d}_0000.nii.gz")
        save_volume(_liver_only(p.labels.array), p.ct, liver / "labelsTr" / f"liver_{i:03d}.nii.gz", label=True)
    btcv = paths["data"] / "BTCV"
    for i in range(config.organ_only_cases):
        p = phantom(1000 + i, 0)
        save_volume(p.ct.array, p.ct, btcv / "imagesTr" / f"img{i + 1:04d}.nii.gz")
        save_volume(p.labels.array, p.ct, btcv / "labelsTr" / f"label{i + 1:04d}.nii.gz", label=True)
    for i in range(config.test_cases):
        p = phantom(5000 + i, config.test_tumors)
        save_volume(p.ct.array, p.ct, paths["test_images"] / f"test_{i:03d}_0000.nii.gz")
        save_volume(_liver_only(p.labels.array), p.ct, paths["test_labels"] / f"test_{i:03d}.nii.gz", label=True)
    for i in range(config.calibration_cases):  # labelled CTs no stage trains on: the audit's calibration
        p = phantom(7000 + i, int(rng.integers(1, 4)))
        save_volume(p.ct.array, p.ct, paths["calibration"] / "imagesTr" / f"calib_{i:03d}_0000.nii.gz")
        save_volume(
            _liver_only(p.labels.array), p.ct, paths["calibration"] / "labelsTr" / f"calib_{i:03d}.nii.gz", label=True
        )
    for i in range(config.heldout_cases):  # organ-only CTs no stage trains on: the generator's held-out crops
        p = phantom(9000 + i, 0)
        save_volume(p.ct.array, p.ct, btcv / "imagesTr" / f"img{HELDOUT_FIRST + i:04d}.nii.gz")
        save_volume(p.labels.array, p.ct, btcv / "labelsTr" / f"label{HELDOUT_FIRST + i:04d}.nii.gz", label=True)
    write_text_atomic(marker, json.dumps({"seed": seed, "config": asdict(config)}, indent=1) + "\n")
    return paths


HELDOUT_FIRST = 9001  # the held-out organ-only CTs are img9001.nii.gz, img9002.nii.gz, ...


def _is_heldout(entry: dict[str, Any]) -> bool:
    name = Path(str(entry["image"])).name
    return name.startswith("img") and name[3:7].isdigit() and int(name[3:7]) >= HELDOUT_FIRST


def _split_for_the_experiment(prepared: Path) -> None:
    """Every labelled and organ-only case trains (the test set is separate), but the held-out organ-only
    CTs: they train nothing and are the validation list, whose crops score the generator."""
    path = prepared / "datalists" / "liver_fold0.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data["training"] + data.get("validation", [])
    data["training"] = [e for e in entries if not _is_heldout(e)]
    data["validation"] = [e for e in entries if _is_heldout(e)]
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def heldout_cases(prepared: Path, data: dict[str, Any] | None = None) -> list[str]:
    """The organ-only cases no stage trains on (the generator's held-out crops come from them); ``data``:
    the prepared data list when it was read already."""
    if data is None:
        data = json.loads((prepared / "datalists" / "liver_fold0.json").read_text(encoding="utf-8"))
    trained = {str(e["image"]) for e in data["training"]}
    return [str(e["image"]) for e in data.get("validation", []) if str(e["image"]) not in trained]


def _seg(config: FairConfig, seed: int, *, mode: str, steps: int, lr: float, warmup: float, synth: str = "rules",
         init: str | None = None, rules: SynthesisConfig | None = None, synth_prob: float = 1.0) -> Any:  # fmt: skip
    from freetumor_cli.core.train_seg import TrainSegConfig

    return TrainSegConfig(
        task="liver", mode=mode, model=config.model, roi=(config.roi,) * 3, spacing_mm=config.spacing_mm,
        # No validation: every run is scored on the calibration or test CTs from its last checkpoint, and
        # the held-out cases (the generator's) hold no tumor, so a validation would only cost a minute.
        max_steps=steps, epochs=steps, lr=lr, warmup_epochs=warmup, val_every=10**6, val_min_steps=steps + 1,
        save_every_steps=max(25, steps // 4), workers=config.workers, seed=seed, synth=synth, init=init,
        rules=rules or SynthesisConfig(), synth_prob=synth_prob,
    )  # fmt: skip


def crop_rules(config: FairConfig) -> SynthesisConfig:
    """The synthesis rules of every run: only the size classes the crop holds (:func:`sizes_for_crop`)."""
    return replace(SynthesisConfig(), mix_sizes=sizes_for_crop(config.roi, config.spacing_mm[0]))


def prepared_world(
    out: Path, config: FairConfig, seed: int, *, step: Callable[[str], None] = lambda _m: None
) -> tuple[dict[str, Path], Path]:
    """:func:`make_world`, then ``prepare`` into ``out/prepared`` with every labelled case for training."""
    from freetumor_cli.core.prepare import PrepareConfig, prepare
    from freetumor_cli.core.preprocess import PreprocessConfig

    world = make_world(out, config, seed)
    prepared = out / "prepared"
    if not (prepared / "datalists" / "liver_fold0.json").is_file():
        step(f"seed {seed}: prepare")
        shutil.rmtree(prepared, ignore_errors=True)
        preprocessing = PreprocessConfig(abdomen_spacing_mm=config.spacing_mm)
        prepare(world["data"], prepared, PrepareConfig(folds=5, seed=seed, preprocessing=preprocessing))
        _split_for_the_experiment(prepared)
    return world, prepared


def baseline_config(config: FairConfig, seed: int, init: Path | None = None) -> Any:
    """The shared baseline's run: labelled cases only, ``baseline_steps`` at ``lr``, 10 % warm-up, CutMix;
    from ``init``'s weights when given (the plateau check's continued attempts)."""
    # An onlylabeled epoch is one step per labelled case (one volume per step, one process).
    warmup = 0.1 * config.baseline_steps / max(1, config.labelled_cases)
    return _seg(config, seed, mode="onlylabeled", steps=config.baseline_steps, lr=config.lr, warmup=warmup,
                rules=crop_rules(config), init=None if init is None else str(init))  # fmt: skip


def _done(run: Path) -> bool:
    return (run / "checkpoints" / "last" / "model.json").is_file() and (run / "summary.json").is_file()


Progress = Callable[[int, int], None]


def train_run(
    prepared: Path, run: Path, seg_config: Any, baseline: Path | None, progress: Progress | None = None
) -> None:
    """Train one run (``train-seg`` with ``seg_config``) unless it is done; resume it if it was interrupted.
    Writes ``summary.json``: steps, seconds, quality-control acceptance, and the loss over its last two fifths."""
    from freetumor_cli.core.train_seg import train_segmentation
    from freetumor_cli.core.training import saved_state

    if _done(run):
        return
    resume = saved_state(run) is not None  # its state, saved every save_every_steps
    if run.exists() and not resume:
        shutil.rmtree(run)
    started = time.perf_counter()
    summary = train_segmentation(
        prepared, run, seg_config, baseline=baseline, resume=resume,
        on_step=None if progress is None else (lambda done, total, _stats: progress(done, total)),
    )  # fmt: skip
    losses = summary.losses
    tail = losses[-max(1, len(losses) // 5) :]
    before = losses[-2 * len(tail) : -len(tail)] or tail
    record = {
        "steps": summary.steps,
        "seconds": round(time.perf_counter() - started, 1),  # this invocation's (a resumed run's last part)
        "qc_acceptance": summary.qc_acceptance,
        "loss_last_fifth": float(np.mean(tail)) if tail else None,
        "loss_fifth_before": float(np.mean(before)) if before else None,
    }
    write_text_atomic(run / "summary.json", json.dumps(record, indent=1) + "\n")


def score_run(run: Path, world: dict[str, Path], out: Path) -> Path:
    """Score a run on the test set; returns its per-lesion CSV (the per-case one lies beside it)."""
    return score_checkpoint(run / "checkpoints" / "last", world["test_images"], world["test_labels"], out)


def score_checkpoint(checkpoint: Path, images: Path, labels: Path, out: Path) -> Path:
    """Predict ``images/*.nii.gz`` with ``checkpoint`` and score them against ``labels``; returns the
    per-lesion CSV (the per-case one lies beside it). Done once: a rerun reads the CSV."""
    from freetumor_cli.core.evaluate import EvaluateConfig, evaluate, write_reports
    from freetumor_cli.core.predict import predict_cases

    if (out / "metrics_per_lesion.csv").is_file():
        return out / "metrics_per_lesion.csv"
    shutil.rmtree(out, ignore_errors=True)
    predict_cases(checkpoint, sorted(images.glob("*.nii.gz")), out / "predictions", overlap=0.5)
    cases, scores, _ = evaluate(out / "predictions", labels, EvaluateConfig(classes=("liver_tumor",)))
    write_reports(cases, scores, out)
    return out / "metrics_per_lesion.csv"


def pooled_dice(lesion_csv: Path) -> float:
    """Tumor Dice over every CT's tumor voxels together, 2·Σ|P∩T| / (Σ|P| + Σ|T|), from an evaluation's
    per-case Dice and volumes (each case's overlap is its Dice times half its two volumes): each tumor
    weighs by its voxels, so a missed 1 ml tumor costs what it holds, not a whole case's Dice. NaN when no
    case holds a tumor or predicts one."""
    dice, volumes = read_scores(lesion_csv)[0], read_volumes(lesion_csv)
    if not dice:
        raise InputError(f"{lesion_csv.parent} scores no label to pool the tumor Dice over", hint="check the folder")
    weights = {case: true + predicted for case, (true, predicted) in volumes.items()}
    total = sum(weights.values())
    return sum(dice[case] * w for case, w in weights.items() if w > 0) / total if total else math.nan


def trained_baseline(
    out: Path, world: dict[str, Path], prepared: Path, config: FairConfig, seed: int, *,
    step: Callable[[str], None] = lambda _m: None, progress: Progress | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train the shared baseline and check, before any arm starts, that it has learned the tumors: its
    tumor Dice pooled over the calibration CTs (:func:`pooled_dice`; labelled, never trained on; not the
    test set) must be at least ``config.plateau_dice``. Otherwise training continues from the last
    attempt's weights for ``baseline_steps // 2`` more steps, as a run of its own (a fresh optimizer, its
    10 % warm-up and cosine schedule over those steps, and its own random stream: ``seed + 1000 ×`` the
    attempt, so it draws other crops than the steps before it), at most ``config.plateau_retries`` times;
    the arms continue from the last attempt either way, and the result says whether it passed.

    Returns ``{"run", "steps", "calibration_dice", "calibration_case_mean", "accepted", "attempts"}``
    (``run``: the accepted run's folder under ``out/runs``, ``runs/baseline`` for the first attempt,
    ``runs/baseline_continued_<steps>`` after; ``steps``: the steps trained in all, the continued ones
    included; ``calibration_dice`` is the pooled Dice, the case mean is reported). ``attempts``: each
    attempt's ``run``, ``steps``, ``calibration_dice``, ``calibration_case_mean`` and ``continued_from``
    (the attempt it continued, ``None`` for the first).
    """
    steps, attempts, calibration = config.baseline_steps, [], world["calibration"]
    extra, previous = max(1, config.baseline_steps // 2), None
    for attempt in range(config.plateau_retries + 1):
        name = "baseline" if previous is None else f"baseline_continued_{steps}"
        run = out / "runs" / name
        if previous is None:
            step(f"seed {seed}: {name} ({steps} steps, warm-up, CutMix)")
            seg_config = baseline_config(config, seed)
        else:
            step(f"seed {seed}: {name} ({previous} continued for {extra} steps, warm-up, CutMix)")
            init = out / "runs" / previous / "checkpoints" / "last"
            seg_config = baseline_config(replace(config, baseline_steps=extra), seed + 1000 * attempt, init=init)
        train_run(prepared, run, seg_config, None, progress)
        lesions = score_checkpoint(
            run / "checkpoints" / "last", calibration / "imagesTr", calibration / "labelsTr",
            out / "eval" / "calibration" / name,
        )  # fmt: skip
        pooled = pooled_dice(lesions)
        per_case = list(read_scores(lesions)[0].values())
        case_mean = float(np.mean(per_case)) if per_case else math.nan
        attempts.append({"run": name, "steps": steps, "calibration_dice": pooled, "calibration_case_mean": case_mean,
                         "continued_from": previous})  # fmt: skip
        if pooled >= config.plateau_dice:
            break
        steps, previous = steps + extra, name
    accepted = pooled >= config.plateau_dice  # the last attempt's
    return {**attempts[-1], "accepted": bool(accepted), "attempts": attempts}


def follow_baseline(runs: Path, accepted: str, step: Callable[[str], None]) -> None:
    """Keep the stages that continue from the baseline (the generator, the arms, their scores and the
    audit) in step with the one the check accepted: when an earlier invocation accepted another (the check
    or its floor changed since), they are removed, to be trained again from this one, never resumed from
    the other. The baseline attempts and their calibration scores stay. The accepted run is recorded in
    ``runs/accepted_baseline.json``; a folder of a version without it is judged by its arms' ``init.json``
    (a generator alone records no critic, and is kept)."""
    marker = runs / "accepted_baseline.json"
    if marker.is_file():
        previous = json.loads(marker.read_text(encoding="utf-8"))["run"]
    else:
        arms = sorted(p for p in runs.glob("*/init.json") if not _is_baseline(p.parent.name))  # not an attempt's
        sources = [json.loads(p.read_text(encoding="utf-8"))["source"] for p in arms]
        previous = next((Path(source).parents[1].name for source in sources), accepted)
    if previous != accepted:
        step(f"the accepted baseline is now {accepted} (it was {previous}): its generator and arms are trained again")
        for folder in runs.iterdir():
            if folder.is_dir() and not _is_baseline(folder.name):
                shutil.rmtree(folder)
        shutil.rmtree(runs.parent / "qc_audit", ignore_errors=True)
        for folder in (runs.parent / "eval").glob("*"):
            if folder.name != "calibration":  # the check's own scores, per attempt
                shutil.rmtree(folder)
    write_text_atomic(marker, json.dumps({"run": accepted}) + "\n")


def _is_baseline(name: str) -> bool:
    """Whether a folder under ``runs`` is one of the baseline check's attempts."""
    # ``baseline_<steps>``: an earlier version's attempts, trained again from scratch.
    return re.fullmatch(r"baseline(_continued_\d+|_\d+)?", name) is not None


def _recalls(prediction_dir: Path, truths: Sequence[tuple[str, np.ndarray]]) -> list[float]:
    """Per tumor, the share of its voxels the baseline predicts as tumor: the quality-control measure
    (:func:`~freetumor_cli.core.seg_data.found_share`) on its whole-CT prediction."""
    from freetumor_cli.core.seg_data import found_share

    return [
        found_share(load_volume(prediction_dir / f"{case}.nii.gz", what="prediction").array, mask, LIVER.tumor_value)
        for case, mask in truths
    ]


def _passes(recall: float, threshold: float) -> bool:
    """A tumor passes the calibrated gate when the baseline finds it at least as well as the threshold, and
    at all (a threshold of 0, from a baseline that finds no real tumor, passes nothing)."""
    return recall > 0 and recall >= threshold


def qc_audit(out: Path, world: dict[str, Path], baseline: Path, generator: Path, config: FairConfig,
             seed: int, rules: SynthesisConfig) -> dict[str, Any]:  # fmt: skip
    """The baseline as a gatekeeper: its recall on real tumors of labelled CTs it never trained on (the
    world's calibration cases) and on synthetic tumors, per engine and size."""
    from scipy import ndimage

    from freetumor_cli.core.predict import predict_cases
    from freetumor_cli.core.seg_data import passes_quality_control
    from freetumor_cli.core.synthesize import synthesize_tumors

    result_file = out / "qc_audit.json"
    if result_file.is_file():
        return dict(json.loads(result_file.read_text(encoding="utf-8")))
    shutil.rmtree(out, ignore_errors=True)
    calibration = world["calibration"]
    images = sorted((calibration / "imagesTr").glob("*.nii.gz"))
    predict_cases(baseline, images, out / "real", overlap=0.5)
    real_truths = []
    for image in images:
        case = image.name.replace("_0000.nii.gz", "")
        labels = load_volume(calibration / "labelsTr" / f"{case}.nii.gz").array
        components, n = ndimage.label(labels == LIVER.tumor_value)
        real_truths += [(case, components == k) for k in range(1, n + 1)]
    real = _recalls(out / "real", real_truths)
    calibrated = float(np.quantile(real, 0.1)) if real else float("nan")
    audit: dict[str, Any] = {"real_recall": real, "calibrated_threshold": calibrated, "engines": {}}
    organ_only = sorted((world["data"] / "BTCV" / "imagesTr").glob("*.nii.gz"))[: config.audit_cases]
    for engine in ("rules", "generator"):
        folder = out / engine
        truths, sizes = [], []
        for k, image in enumerate(organ_only):
            ct = load_volume(image)
            labels = load_volume(world["data"] / "BTCV" / "labelsTr" / image.name.replace("img", "label"))
            size = rules.mix_sizes[k % len(rules.mix_sizes)] if rules.mix_sizes else "mix"
            made = synthesize_tumors(
                ct.array, labels.array, "liver", affine=ct.affine, seed=seed * 1000 + k, size=size, count=1,
                rules=rules, generator=str(generator) if engine == "generator" else None, label_scheme="freetumor",
            )  # fmt: skip
            name = f"audit_{k:03d}"
            save_volume(made.image, ct, folder / "images" / f"{name}_0000.nii.gz")
            truths.append((name, made.label == LIVER.tumor_value))
            sizes.append(made.tumors[0].size_class)
        predict_cases(baseline, sorted((folder / "images").glob("*.nii.gz")), folder / "predictions", overlap=0.5)
        recalls = _recalls(folder / "predictions", truths)
        per_size = {}
        for size in dict.fromkeys(sizes):
            chosen = [r for r, s in zip(recalls, sizes, strict=True) if s == size]
            per_size[size] = {
                "n": len(chosen),
                "pass_0.7": float(np.mean([passes_quality_control(r, 0.7) for r in chosen])),
                "pass_calibrated": float(np.mean([_passes(r, calibrated) for r in chosen])),
            }
        audit["engines"][engine] = {
            "recall": recalls,
            "pass_0.7": float(np.mean([passes_quality_control(r, 0.7) for r in recalls])),
            "pass_calibrated": float(np.mean([_passes(r, calibrated) for r in recalls])),
            "per_size": per_size,
        }
        shutil.rmtree(folder / "images", ignore_errors=True)
    write_text_atomic(result_file, json.dumps(audit, indent=1) + "\n")
    return audit


def real_contrast(world: dict[str, Path]) -> float:
    """The labelled cases' real tumors: their mean HU minus that of the liver around them (within 6 mm)."""
    from scipy import ndimage

    liver = world["data"] / "Dataset003_Liver"
    differences = []
    for label_path in sorted((liver / "labelsTr").glob("*.nii.gz")):
        labels = load_volume(label_path)
        ct = load_volume(liver / "imagesTr" / label_path.name.replace(".nii.gz", "_0000.nii.gz")).array
        tumor = labels.array == LIVER.tumor_value
        if not tumor.any():
            continue
        iterations = max(1, round(6.0 / float(min(labels.spacing))))
        ring = ndimage.binary_dilation(tumor, iterations=iterations) & (labels.array == LIVER.value)
        if ring.any():
            differences.append(float(ct[tumor].mean() - ct[ring].mean()))
    return float(np.mean(differences)) if differences else math.nan


def generator_measures(run: Path) -> dict[str, float]:
    """The generator's held-out measures at its last scoring, and the rules' on the same crops (from
    train-synth's ``metrics.jsonl``): QC pass rate, HU contrast, halo."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    generator = [r for r in rows if "hu_contrast" in r]
    rules = [r for r in rows if "rules_hu_contrast" in r]
    out: dict[str, float] = {}
    for key in ("qc_pass_rate", "hu_contrast", "halo"):
        out[f"generator_{key}"] = float(generator[-1][key]) if generator and key in generator[-1] else math.nan
        out[f"rules_{key}"] = float(rules[-1][f"rules_{key}"]) if rules and f"rules_{key}" in rules[-1] else math.nan
    return out


def matched_rules(rules: SynthesisConfig, measures: dict[str, float]) -> tuple[SynthesisConfig, float]:
    """The rules with their HU change scaled so that their measured contrast is the generator's (arm C′):
    both were measured on the same held-out crops and tumor geometry. Returns (rules, the scale)."""
    if not math.isfinite(measures["generator_hu_contrast"]) or not math.isfinite(measures["rules_hu_contrast"]):
        raise InputError(
            "the generator's run measured no contrast on held-out crops, so arm C′ cannot match it",
            hint="check runs/generator/metrics.jsonl; the world needs held-out organ-only CTs (heldout_cases)",
        )
    rules_contrast = measures["rules_hu_contrast"]
    scale = measures["generator_hu_contrast"] / rules_contrast if rules_contrast else math.nan
    if not math.isfinite(scale) or scale <= 0:
        scale = 1.0  # a generator without a tumor's contrast (or of the wrong sign): C′ is C
    low, high = rules.abdomen_hu_change
    return replace(rules, abdomen_hu_change=(low * scale, high * scale)), float(scale)


def run_seed(
    out: Path, config: FairConfig, seed: int, *, step: Callable[[str], None] = lambda _m: None,
    progress: Progress | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One seed's world, baseline, generator, arms, test scores and audit (each stage resumable).

    ``step`` gets a line as each stage starts, ``progress`` (done, total) during training.
    """
    out.mkdir(parents=True, exist_ok=True)
    rules = crop_rules(config)
    step(f"seed {seed}: phantom world")
    world, prepared = prepared_world(out, config, seed, step=step)
    runs = out / "runs"
    checked = trained_baseline(out, world, prepared, config, seed, step=step, progress=progress)
    follow_baseline(runs, checked["run"], step)
    baseline_run = runs / checked["run"]
    baseline = baseline_run / "checkpoints" / "last"
    generator = runs / "generator" / "checkpoints" / "last"  # the rule: the last checkpoint, fixed in advance
    wants_generator = any(a in config.arms for a in ("Cp", "D", "E")) or config.audit_cases
    if wants_generator:
        train_generator_run(prepared, runs / "generator", config, seed, baseline, step=step, progress=progress)
    measures = generator_measures(runs / "generator") if wants_generator else {}
    contrast_rules, scale = matched_rules(rules, measures) if measures else (rules, 1.0)
    arm_specs: dict[str, tuple[str, str, bool, SynthesisConfig, float]] = {
        "A": ("onlylabeled", "rules", False, rules, 1.0),
        "Ap": ("freesyn", "rules", False, rules, 0.0),
        "B": ("freesyn", "rules", False, rules, 1.0),
        "C": ("freesyn", "rules", True, rules, 1.0),
        "Cp": ("freesyn", "rules", True, contrast_rules, 1.0),
        "D": ("freesyn", str(generator), True, rules, 1.0),
        "E": ("freesyn", str(generator), False, rules, 1.0),
    }
    scores: dict[str, Path] = {}
    for arm in config.arms:
        mode, synth, qc, arm_rules, prob = arm_specs[arm]
        step(f"seed {seed}: arm {label(arm)} ({ARMS[arm]}, {config.arm_steps} steps from the baseline)")
        seg_config = _seg(config, seed, mode=mode, steps=config.arm_steps, lr=config.arm_lr, warmup=0.0, synth=synth,
                          init=str(baseline), rules=arm_rules, synth_prob=prob)  # fmt: skip
        train_run(prepared, runs / arm, seg_config, baseline if qc else None, progress)
        scores[arm] = score_run(runs / arm, world, out / "eval" / arm)
    step(f"seed {seed}: baseline on the test set")
    scores["baseline"] = score_run(baseline_run, world, out / "eval" / "baseline")
    audit = None
    if config.audit_cases:
        step(f"seed {seed}: quality-control audit")
        audit = qc_audit(out / "qc_audit", world, baseline, generator, config, seed, rules)
    kept = {arm: json.loads((runs / arm / "summary.json").read_text())["qc_acceptance"] for arm in config.arms}
    contrast = {"seed": seed, "real_hu": real_contrast(world), **measures, "matched_scale": scale}
    return {"seed": seed, "scores": {k: str(v) for k, v in scores.items()}, "qc_acceptance": kept, "audit": audit,
            "sizes": list(rules.mix_sizes), "contrast": contrast,
            "baseline": checked, "baseline_plateau": json.loads((baseline_run / "summary.json").read_text())}  # fmt: skip


def generator_config(config: FairConfig, seed: int, prepared: Path) -> Any:
    """The generator's run, the method's recipe scaled down: labelled cases repeated so that about
    ``generator_tumor_share`` of its samples hold a real tumor, ``synth_steps`` at ``synth_lr``, scored each
    epoch on one held-out crop of each held-out case (no stage trains on them)."""
    from freetumor_cli.core.train_synth import TrainSynthConfig

    data = json.loads((prepared / "datalists" / "liver_fold0.json").read_text(encoding="utf-8"))
    labelled = sum(e.get("role") == "tumor-labelled" for e in data["training"])
    organ_only = len(data["training"]) - labelled
    share = config.generator_tumor_share
    repeats = max(1, round(share / (1 - share) * organ_only / max(1, labelled))) if share < 1 else 1
    heldout = heldout_cases(prepared, data)
    if not heldout:
        raise InputError(
            f"{prepared} holds no organ-only case outside training, so the generator has no held-out crops",
            hint="the world needs held-out organ-only CTs (FairConfig.heldout_cases > 0)",
        )
    return TrainSynthConfig(
        region="abdomen", max_steps=config.synth_steps, roi=(config.roi,) * 3, labelled_repeats=repeats,
        base_channels=config.generator_channels, heldout_crops=len(heldout), lr=config.synth_lr,
        save_every_steps=max(25, config.synth_steps // 4), workers=config.workers, seed=seed,
        spacing_mm=config.spacing_mm, rules=crop_rules(config),
    )  # fmt: skip


def train_generator_run(
    prepared: Path, run: Path, config: FairConfig, seed: int, baseline: Path, *,
    step: Callable[[str], None] = lambda _m: None, progress: Progress | None = None,
) -> None:  # fmt: skip
    """Train the generator unless it is done (its last checkpoint written); resume it if interrupted."""
    from freetumor_cli.core.train_synth import train_generator

    if (run / "checkpoints" / "last" / "generator.json").is_file():
        return
    from freetumor_cli.core.training import saved_state

    resume = saved_state(run) is not None
    if run.exists() and not resume:
        shutil.rmtree(run)
    step(f"seed {seed}: generator ({config.synth_steps} steps at lr {config.synth_lr:g}, the baseline as critic)")
    train_generator(
        prepared, run, generator_config(config, seed, prepared), baseline=baseline, resume=resume,
        on_step=None if progress is None else (lambda done, total, _stats: progress(done, total)),
    )  # fmt: skip


# ---- paired statistics ------------------------------------------------------------------------------


def read_scores(lesion_csv: Path) -> tuple[dict[str, float], dict[tuple[str, int], tuple[bool, float]]]:
    """(case -> tumor Dice, (case, lesion) -> (detected, radius mm)) from an evaluation's CSVs."""
    dice = {}
    with (lesion_csv.parent / "metrics_per_case.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["class"] == "liver_tumor":
                dice[row["case"]] = float(row["dice"])
    lesions = {}
    with lesion_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["class"] == "liver_tumor" and row["source"] == "gt":
                lesions[(row["case"], int(row["index"]))] = (row["matched"] == "True", float(row["radius_mm"]))
    return dice, lesions


def read_volumes(lesion_csv: Path) -> dict[str, tuple[float, float]]:
    """case -> (true, predicted) tumor volume in ml, from an evaluation's per-case CSV."""
    volumes = {}
    with (lesion_csv.parent / "metrics_per_case.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["class"] == "liver_tumor":
                volumes[row["case"]] = (float(row["gt_volume_ml"]), float(row["pred_volume_ml"]))
    return volumes


def volume_ratio(volumes: Sequence[tuple[float, float]]) -> float:
    """The median over test CTs of predicted / true tumor volume (below 1: the network stops short)."""
    ratios = [pred / true for true, pred in volumes if true > 0]
    return float(np.median(ratios)) if ratios else math.nan


def bootstrap_ci(differences: Sequence[Sequence[float]], *, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean difference, resampling cases within each group (seed)."""
    rng = np.random.default_rng(seed)
    groups = [np.asarray(g, dtype=np.float64) for g in differences if len(g)]
    if not groups:
        return float("nan"), float("nan")
    total = sum(len(g) for g in groups)
    means = np.zeros(resamples)
    for g in groups:
        picks = rng.integers(0, len(g), size=(resamples, len(g)))
        means += g[picks].sum(axis=1)
    means /= total
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences (1 when every difference is 0)."""
    from scipy import stats

    values = np.asarray(differences, dtype=np.float64)
    if not np.any(values != 0):
        return 1.0
    return float(stats.wilcoxon(values, zero_method="wilcox").pvalue)


def mcnemar_p(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test of paired detections: (found by first only, by second only, two-sided p)."""
    from scipy import stats

    a = int(sum(f and not s for f, s in zip(first, second, strict=True)))
    b = int(sum(s and not f for f, s in zip(first, second, strict=True)))
    return a, b, (float(stats.binomtest(a, a + b, 0.5).pvalue) if a + b else 1.0)


def paired_table(seeds: Sequence[dict[str, Any]], arms: Sequence[str], *, resamples: int) -> list[dict[str, Any]]:
    """Per comparison (X - Y): the paired figures pooled over seeds."""
    loaded = [{arm: read_scores(Path(s["scores"][arm])) for arm in (*arms, "baseline")} for s in seeds]
    rows = []
    for x, y in COMPARISONS:
        if x not in arms or y not in arms:
            continue
        per_seed = [[d[x][0][c] - d[y][0][c] for c in sorted(d[x][0]) if c in d[y][0]] for d in loaded]
        pooled = [v for g in per_seed for v in g]
        seed_means = [float(np.mean(g)) if g else math.nan for g in per_seed]
        sign = np.sign(np.mean(pooled)) if pooled else 0.0
        keys = [[k for k in sorted(d[x][1]) if k in d[y][1]] for d in loaded]
        found_x = [d[x][1][k][0] for d, ks in zip(loaded, keys, strict=True) for k in ks]
        found_y = [d[y][1][k][0] for d, ks in zip(loaded, keys, strict=True) for k in ks]
        early = [d[x][1][k][1] <= EARLY_RADIUS_MM for d, ks in zip(loaded, keys, strict=True) for k in ks]
        ex = [f for f, e in zip(found_x, early, strict=True) if e]
        ey = [f for f, e in zip(found_y, early, strict=True) if e]
        low, high = bootstrap_ci(per_seed, resamples=resamples)
        only_x, only_y, p_lesion = mcnemar_p(found_x, found_y)
        early_only_x, early_only_y, p_early = mcnemar_p(ex, ey)
        rows.append({
            "comparison": f"{label(x)} - {label(y)}", "cases": len(pooled),
            "dice_diff": float(np.mean(pooled)) if pooled else math.nan, "seed_diffs": seed_means,
            "seeds_agree": int(sum(np.sign(m) == sign and sign != 0 for m in seed_means)),
            "ci_low": low, "ci_high": high, "wilcoxon_p": wilcoxon_p(pooled),
            "lesions": len(found_x), "sens_x": float(np.mean(found_x)) if found_x else math.nan,
            "sens_y": float(np.mean(found_y)) if found_y else math.nan, "only_x": only_x, "only_y": only_y,
            "mcnemar_p": p_lesion, "early_lesions": len(ex), "early_sens_x": float(np.mean(ex)) if ex else math.nan,
            "early_sens_y": float(np.mean(ey)) if ey else math.nan, "early_mcnemar_p": p_early,
            "early_only_x": early_only_x, "early_only_y": early_only_y,
        })  # fmt: skip
    return rows


def arm_summary(seeds: Sequence[dict[str, Any]], arms: Sequence[str]) -> list[dict[str, Any]]:
    """Per arm: mean tumor Dice, lesion sensitivity and early sensitivity, pooled over seeds."""
    rows = []
    for arm in (*arms, "baseline"):
        dice, found, early, volumes = [], [], [], []
        for s in seeds:
            d, lesions = read_scores(Path(s["scores"][arm]))
            volumes += list(read_volumes(Path(s["scores"][arm])).values())
            dice += list(d.values())
            found += [f for f, _ in lesions.values()]
            early += [f for f, r in lesions.values() if r <= EARLY_RADIUS_MM]
        qc = [s["qc_acceptance"].get(arm) for s in seeds if s["qc_acceptance"].get(arm) is not None]
        rows.append({
            "arm": label(arm), "what": ARMS.get(arm, "the shared baseline"), "dice": float(np.mean(dice)),
            "seed_dice": [float(np.mean(list(read_scores(Path(s["scores"][arm]))[0].values()))) for s in seeds],
            "volume_ratio": volume_ratio(volumes),
            "sensitivity": float(np.mean(found)) if found else math.nan,
            "early_sensitivity": float(np.mean(early)) if early else math.nan,
            "qc_kept": float(np.mean(qc)) if qc else None,
        })  # fmt: skip
    return rows


def paired_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The paired comparisons of :func:`paired_table` as a Markdown table."""
    lines = [
        "| comparison | cases | Δ Dice [95 % CI] | per seed | seeds agreeing | Wilcoxon p "
        "| lesions: sens. X / Y (only X, only Y) | McNemar p | early: sens. X / Y | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{m:+.3f}" for m in r["seed_diffs"])
        lines.append(
            f"| {r['comparison']} | {r['cases']} | {r['dice_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
            f"{per_seed} | {r['seeds_agree']} of {len(r['seed_diffs'])} | "
            f"{r['wilcoxon_p']:.3g} | {r['sens_x']:.3f} / {r['sens_y']:.3f} ({r['only_x']}, {r['only_y']}) | "
            f"{r['mcnemar_p']:.3g} | {r['early_sens_x']:.3f} / {r['early_sens_y']:.3f} of {r['early_lesions']} "
            f"({r['early_only_x']}, {r['early_only_y']}) | {r['early_mcnemar_p']:.3g} |"
        )
    return "\n".join(lines)


def audit_markdown(audits: Sequence[dict[str, Any]]) -> str:
    """The quality-control audits of :func:`qc_audit`, pooled, as Markdown lines."""
    real = [r for a in audits for r in a["real_recall"]]
    thresholds = [a["calibrated_threshold"] for a in audits]
    lines = [
        "Quality-control audit (the baseline's voxel recall as gatekeeper, pooled over seeds):",
        "",
        f"- real tumors of labelled CTs no stage trained on: {len(real)}, mean recall {np.mean(real):.2f}; "
        f"calibrated threshold (passes 90 % of them) {', '.join(f'{t:.2f}' for t in thresholds)}",
    ]
    for engine in ("rules", "generator"):
        e = [a["engines"][engine] for a in audits]
        sizes = sorted({s for x in e for s in x["per_size"]}, key=list(SIZE_CLASSES).index)
        per = "; ".join(
            f"{s} {np.mean([x['per_size'][s]['pass_0.7'] for x in e if s in x['per_size']]):.0%} / "
            f"{np.mean([x['per_size'][s]['pass_calibrated'] for x in e if s in x['per_size']]):.0%}"
            for s in sizes
        )
        lines.append(
            f"- {engine}: pass at 0.7 {np.mean([x['pass_0.7'] for x in e]):.0%}, at the calibrated threshold "
            f"{np.mean([x['pass_calibrated'] for x in e]):.0%} (per size, 0.7 / calibrated: {per})"
        )
    return "\n".join(lines)


def baseline_steps(check: dict[str, Any], planned: int) -> str:
    """The accepted baseline's steps in words: ``2000 steps``, or ``2000 steps, then 1000 more from its
    weights`` for an attempt that continued another (``check``: :func:`trained_baseline`'s result; empty
    before it ran, when ``planned`` is said)."""
    attempts = check.get("attempts") or [{"steps": planned}]
    first, last = attempts[0]["steps"], attempts[-1]["steps"]
    return f"{first} steps" if last == first else f"{first} steps, then {last - first} more from its weights"


def baseline_markdown(seeds: Sequence[dict[str, Any]], config: FairConfig) -> str:
    """Per seed: the baseline's plateau check (:func:`trained_baseline`), each attempt and its verdict."""
    lines = [
        f"Baseline check before the arms (tumor Dice pooled over the calibration CTs >= {config.plateau_dice:g}; "
        "in brackets, the mean of the CTs' Dice):",
        "",
    ]
    for s in seeds:
        check = s["baseline"]
        tried, before = [], 0
        for a in check["attempts"]:
            how = f" ({before} + {a['steps'] - before} continued)" if a.get("continued_from") else ""
            tried.append(f"{a['steps']} steps{how} {a['calibration_dice']:.2f} ({a['calibration_case_mean']:.2f})")
            before = a["steps"]
        verdict = (
            "passed" if check["accepted"] else "**failed**: its arms continue from a baseline short of the plateau"
        )
        lines.append(f"- seed {s['seed']}: {' → '.join(tried)}; {verdict}")
    return "\n".join(lines)


def contrast_markdown(contrasts: Sequence[dict[str, float]]) -> str:
    """Per seed: the tumors' HU contrast (real, rules, generator, C′'s rules) and their halo."""
    lines = [
        "Tumor contrast and halo. Rules, generator: on the generator's held-out crops, the mean HU change "
        "inside the label, and the organ voxels outside the label changed >= 25 HU towards tumor, per "
        "labelled voxel. Real: in the labelled CTs, the tumors' mean HU minus that of the liver within 6 mm "
        "around them (no before-image exists for a real tumor). C′: the factor on the rules' HU change:",
        "",
        "| seed | real tumors | rules: contrast, halo | generator: contrast, halo, QC pass | C′ rules: HU change × |",
        "|---|---|---|---|---|",
    ]
    for k, c in enumerate(contrasts):
        lines.append(
            f"| {c.get('seed', k)} | {c['real_hu']:+.0f} | {c['rules_hu_contrast']:+.0f}, {c['rules_halo']:.2f} | "
            f"{c['generator_hu_contrast']:+.0f}, {c['generator_halo']:.2f}, {c['generator_qc_pass_rate']:.0%} | "
            f"{c['matched_scale']:.2f} |"
        )
    return "\n".join(lines)


def markdown(seeds: Sequence[dict[str, Any]], config: FairConfig) -> str:
    """The result tables: arms, paired comparisons, the quality-control audit."""
    arms = [a for a in config.arms]
    lines = [
        "| arm | what | tumor Dice | per seed | lesion sens. | sens. <= 10 mm | predicted / true volume | QC kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in arm_summary(seeds, arms):
        qc = "" if r["qc_kept"] is None else f"{r['qc_kept']:.0%}"
        per_seed = ", ".join(f"{d:.3f}" for d in r["seed_dice"])
        lines.append(f"| {r['arm']} | {r['what']} | {r['dice']:.3f} | {per_seed} | {r['sensitivity']:.3f} | "
                     f"{r['early_sensitivity']:.3f} | {r['volume_ratio']:.2f} | {qc} |")  # fmt: skip
    lines += ["", paired_markdown(paired_table(seeds, arms, resamples=config.bootstrap))]
    checks = [s for s in seeds if s.get("baseline")]
    if checks:
        lines += ["", baseline_markdown(checks, config)]
    contrasts = [s["contrast"] for s in seeds if s.get("contrast") and "generator_hu_contrast" in s["contrast"]]
    if contrasts:
        lines += ["", contrast_markdown(contrasts)]
    audits = [s["audit"] for s in seeds if s.get("audit")]
    if audits:
        lines += ["", audit_markdown(audits)]
    return "\n".join(lines)


def run_experiment(out_dir: str | Path, config: FairConfig, *, step: Callable[[str], None] = lambda _m: None) -> str:
    """Every seed (resumable), then the tables, also written to ``<out>/fair_toy.md`` and ``.json``."""
    out = writable_folder(out_dir)  # a file or a folder that cannot be written: one line, before any work
    seeds = [run_seed(out / f"seed_{s}", config, s, step=step) for s in config.seeds]
    text = markdown(seeds, config)
    write_text_atomic(out / "fair_toy.md", text + "\n")
    write_text_atomic(out / "fair_toy.json", json.dumps({"config": asdict(config), "seeds": seeds}, indent=1) + "\n")
    return text
