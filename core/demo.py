"""The built-in demo: a shorter run of the fair, paired experiment (:mod:`freetumor_cli.core.fair`).

One phantom world (no data, no network): labelled CTs whose "real" tumors are drawn by the phantom's
own recipe, organ-only CTs, and a held-out test set fixed before training. Then ``prepare``, one shared
baseline (``train-seg --mode onlylabeled`` with warm-up and CutMix), the generator (``train-synth``, the
baseline as critic), six arms that continue from the baseline for the same steps (A labelled only; A′ +
organ-only crops without synthesis; B + rule-based tumors; C + rule-based tumors with quality control;
C′ as C at the generator's measured contrast; D + generator tumors with quality control, the method),
``synthesize`` with both engines, ``evaluate`` of every run on the test set, and a quality-control audit. The report holds the paired table (per-case Dice differences with bootstrap
intervals, Wilcoxon and McNemar p) and a plot of the per-case differences.

Everything is small so that a laptop CPU finishes it in minutes: 3 mm voxels, a MONAI UNet on 32³
crops. It shows the pipeline working and the size of each effect in a phantom world, with its
uncertainty; it says nothing about accuracy on real CT. ``benchmarks/fair_toy.py`` runs the full design
over three seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freetumor_cli.core.errors import InputError
from freetumor_cli.core.fair import ARMS, FairConfig, baseline_steps, label
from freetumor_cli.core.outputs import OutputLock, atomic_path, write_text_atomic

# The comparison's columns, and its rows: run folder -> what it is.
COMPARISON_COLUMNS = ("tumor Dice", "lesion sensitivity", "sensitivity <= 10 mm", "FP per case")
DEMO_ARMS = ("A", "Ap", "B", "C", "Cp", "D")  # the experiment's arms but E (generator tumors without QC)
MODELS = {"baseline": "the shared baseline: labelled cases only", **{arm: ARMS[arm] for arm in DEMO_ARMS}}


@dataclass(frozen=True)
class DemoConfig:
    """The size of the demo world and of each training stage (a :class:`FairConfig` for one seed).

    Attributes:
        quick: the short preset (a few minutes on 2 CPU cores); too short for the comparison to mean much.
        seed: seeds the phantoms and every stage.
        labelled_cases, organ_only_cases, test_cases: the world (3 tumors per test CT).
        calibration_cases: labelled CTs outside the data that calibrate the quality-control audit.
        heldout_cases: organ-only CTs no stage trains on, whose crops score the generator.
        shape, spacing_mm, tumor_radius_mm: the phantoms and their "real" tumors' radii.
        model, roi: the segmentation network and its crop size in voxels.
        baseline_steps, arm_steps: optimizer steps of the baseline and of each arm.
        synth_steps, generator_channels: the generator run.
        audit_cases: organ-only CTs per engine in the quality-control audit.
        workers: data loader processes per run.
    """

    # The world and the stages are the benchmark's (FairConfig's defaults); only the case counts are smaller.
    quick: bool = False
    seed: int = 0
    labelled_cases: int = FairConfig.labelled_cases
    organ_only_cases: int = 16
    test_cases: int = 8
    calibration_cases: int = 3
    heldout_cases: int = 8
    shape: tuple[int, int, int] = FairConfig.shape
    spacing_mm: tuple[float, float, float] = FairConfig.spacing_mm
    tumor_radius_mm: tuple[float, float] = FairConfig.tumor_radius_mm
    model: str = FairConfig.model
    roi: int = FairConfig.roi
    baseline_steps: int = FairConfig.baseline_steps
    arm_steps: int = FairConfig.arm_steps
    synth_steps: int = FairConfig.synth_steps
    generator_channels: int = FairConfig.generator_channels
    audit_cases: int = 8
    workers: int = FairConfig.workers

    @classmethod
    def preset(cls, *, quick: bool = False, seed: int = 0) -> DemoConfig:
        """The default preset, or the ``quick`` one."""
        if quick:
            return cls(
                quick=True, seed=seed, organ_only_cases=6, test_cases=4, calibration_cases=2, heldout_cases=2,
                baseline_steps=40,
                arm_steps=20, synth_steps=10, generator_channels=4, audit_cases=2,
            )  # fmt: skip
        return cls(seed=seed)

    def fair(self) -> FairConfig:
        return FairConfig(
            seeds=(self.seed,), labelled_cases=self.labelled_cases, organ_only_cases=self.organ_only_cases,
            test_cases=self.test_cases, calibration_cases=self.calibration_cases, heldout_cases=self.heldout_cases,
            shape=self.shape, spacing_mm=self.spacing_mm,
            tumor_radius_mm=self.tumor_radius_mm, roi=self.roi, model=self.model,
            baseline_steps=self.baseline_steps, arm_steps=self.arm_steps, synth_steps=self.synth_steps,
            generator_channels=self.generator_channels, arms=DEMO_ARMS, audit_cases=self.audit_cases,
            bootstrap=1000, workers=self.workers, plateau_retries=0 if self.quick else 1,
        )  # fmt: skip


@dataclass
class DemoResult:
    """What the demo wrote, and the comparison."""

    out_dir: Path
    report: Path | None = None
    comparison: dict[str, dict[str, float | None]] = field(default_factory=dict)
    paired: list[dict[str, Any]] = field(default_factory=list)
    qc_acceptance: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def comparison_row(summary: dict[str, Any], cls: str = "liver_tumor") -> dict[str, float | None]:
    """The comparison's figures from an ``evaluate`` summary."""
    scores = summary["classes"][cls]
    lesions = scores["lesions"]
    return dict(
        zip(
            COMPARISON_COLUMNS,
            (scores["dice"]["mean"], lesions["sensitivity"], lesions["early_sensitivity"], lesions["fp_per_case"]),
            strict=True,
        )
    )


def run_demo(
    out_dir: str | os.PathLike[str],
    config: DemoConfig | None = None,
    *,
    on_step: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Run the whole pipeline in ``out_dir`` (its demo folders are re-created on every run).

    Args:
        out_dir: the demo folder: the world (``data/``, ``test/``), ``prepared/``, ``runs/<model>`` and
            ``runs/generator``, ``synthetic/{rules,generator}``, ``eval/<model>``, ``qc_audit/``,
            ``report.md``, ``comparison.json`` and ``paired_differences.png``, where ``<model>`` is each
            key of :data:`MODELS`.
        config: sizes; :meth:`DemoConfig.preset` by default.
        on_step: called with a one-line description as each stage starts.
        on_progress: called with (step, total) during training stages.
    """
    config = config or DemoConfig.preset()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file", hint="choose a folder for the demo's outputs")
    with OutputLock(out, "demo"):
        return _run_demo(out, config, step=on_step or (lambda _message: None), on_progress=on_progress)


DEMO_FOLDERS = ("data", "test", "calibration", "prepared", "runs", "synthetic", "eval", "qc_audit")


def _run_demo(
    out: Path, config: DemoConfig, *, step: Callable[[str], None], on_progress: Callable[[int, int], None] | None
) -> DemoResult:
    import shutil
    import time

    from freetumor_cli.core.cases import Case
    from freetumor_cli.core.fair import paired_table, run_seed
    from freetumor_cli.core.synthesis_config import SynthesizeConfig
    from freetumor_cli.core.synthesize import synthesize_case

    for name in (*DEMO_FOLDERS, "world.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    result = DemoResult(out)
    started = time.perf_counter()
    fair = config.fair()
    seed = run_seed(out, fair, config.seed, step=lambda m: step(f"{m} -> {out}"), progress=on_progress)
    result.seconds["experiment"] = round(time.perf_counter() - started, 1)
    generator = out / "runs" / "generator" / "checkpoints" / "last"
    organ_only = sorted((out / "data" / "BTCV" / "imagesTr").glob("*.nii.gz"))[0]
    case = Case(organ_only, out / "data" / "BTCV" / "labelsTr" / organ_only.name.replace("img", "label"), "demo")
    for engine in ("rules", "generator"):
        step(f"synthesize --engine {engine}: liver tumors into an organ-only CT -> {out / 'synthetic' / engine}")
        synth_case = SynthesizeConfig(
            organ="liver", size="mix", count=2, seed=config.seed, engine=engine,
            generator=str(generator) if engine == "generator" else None, preview=True, overwrite=True,
        )  # fmt: skip
        synthesize_case(case, synth_case, out / "synthetic" / engine)
    for name in MODELS:
        summary = json.loads((out / "eval" / name / "summary.json").read_text(encoding="utf-8"))
        result.comparison[name] = comparison_row(summary)
    result.paired = paired_table([seed], fair.arms, resamples=fair.bootstrap)
    result.qc_acceptance = dict(seed["qc_acceptance"])
    plot_paired_differences([seed], fair.arms, out / "paired_differences.png")
    result.seconds["total"] = round(time.perf_counter() - started, 1)
    result.report = write_text_atomic(out / "report.md", report_markdown(result, config, seed))
    write_text_atomic(
        out / "comparison.json",
        json.dumps(
            {"config": asdict(config), "comparison": result.comparison, "paired": result.paired,
             "qc_acceptance": result.qc_acceptance, "audit": seed.get("audit"), "seconds": result.seconds},
            indent=2,
        ) + "\n",
    )  # fmt: skip
    return result


def plot_paired_differences(seeds: list[dict[str, Any]], arms: tuple[str, ...], path: Path) -> Path:
    """Per comparison, every test case's tumor Dice difference (a dot each), with the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from freetumor_cli.core.fair import COMPARISONS, read_scores

    loaded = [{arm: read_scores(Path(s["scores"][arm]))[0] for arm in arms} for s in seeds]
    pairs = [(x, y) for x, y in COMPARISONS if x in arms and y in arms]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(pairs), 3.2), dpi=110)
    rng = np.random.default_rng(0)
    for k, (x, y) in enumerate(pairs):
        diffs = [d[x][c] - d[y][c] for d in loaded for c in sorted(d[x]) if c in d[y]]
        ax.scatter(k + rng.uniform(-0.12, 0.12, len(diffs)), diffs, s=14, alpha=0.7)
        if diffs:
            ax.hlines(float(np.mean(diffs)), k - 0.25, k + 0.25, color="black")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(pairs)), [f"{label(x)} - {label(y)}" for x, y in pairs])
    ax.set_ylabel("tumor Dice difference per test CT")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def comparison_markdown(comparison: dict[str, dict[str, float | None]]) -> str:
    lines = ["| model | " + " | ".join(COMPARISON_COLUMNS) + " |", "|---|" + "---|" * len(COMPARISON_COLUMNS)]
    for name, row in comparison.items():
        lines.append(
            f"| {label(name)} | "
            + " | ".join(_fmt(row[c], 2 if c == "FP per case" else 3) for c in COMPARISON_COLUMNS)
            + " |"
        )
    return "\n".join(lines)


def report_markdown(result: DemoResult, config: DemoConfig, seed: dict[str, Any] | None = None) -> str:
    """The one-page report: what ran, the comparison, the paired table, previews and plots."""
    from freetumor_cli.core.fair import audit_markdown, baseline_markdown, contrast_markdown, paired_markdown

    baseline = (seed or {}).get("baseline", {})  # the plateau check's accepted run
    images = [
        ("per-case tumor Dice differences (a dot per test CT, the bar their mean)", "paired_differences.png"),
        ("synthetic liver tumors, rule-based engine", "synthetic/rules/demo_liver_synthetic_preview.png"),
        ("synthetic liver tumors, learned generator", "synthetic/generator/demo_liver_synthetic_preview.png"),
        ("baseline training curves", f"runs/{baseline.get('run', 'baseline')}/curves.png"),
        *((f"arm {label(arm)} training curves", f"runs/{arm}/curves.png") for arm in DEMO_ARMS),
    ]
    previews = sorted((result.out_dir / "runs" / "generator" / "previews").glob("*.png"))
    if previews:
        images.append(("generator on held-out crops, last epoch", previews[-1].relative_to(result.out_dir).as_posix()))
    kept = ", ".join(f"{label(arm)} {v:.0%}" for arm, v in result.qc_acceptance.items() if v is not None) or "n/a"
    audit = (seed or {}).get("audit")
    audit_lines = [audit_markdown([audit]), ""] if audit else []
    lines = [
        "# freetumor demo",
        "",
        f"Phantom world ({'quick' if config.quick else 'default'} preset, seed {config.seed}): "
        f"{config.labelled_cases} liver CTs with tumor labels, {config.organ_only_cases} CTs with organ labels only, "
        f"{config.test_cases} held-out test CTs with 3 liver tumors each, drawn by the phantom's recipe (not the "
        f"synthesizer's). {config.spacing_mm[0]:g} mm voxels, MONAI {config.model} on {config.roi}³ crops. One "
        f"baseline ({baseline_steps(baseline, config.baseline_steps)}, warm-up, CutMix); "
        f"every arm continues from it for "
        f"{config.arm_steps} steps with the same seed and the same crops (B-D: the same tumor geometry in every "
        f"crop); the generator trained {config.synth_steps} steps with the baseline as critic (its last checkpoint). Synthetic sizes are those a crop holds (diameter at most half its side): "
        f"{', '.join((seed or {}).get('sizes', []))}.",
        "",
        "## Test set: liver tumors",
        "",
        comparison_markdown(result.comparison),
        "",
        *(f"- `{label(name)}`: {what}" for name, what in MODELS.items()),
        "",
        "## Paired differences",
        "",
        paired_markdown(result.paired),
        "",
        "Per test CT, arm X's tumor Dice minus arm Y's: the mean with a 95 % bootstrap interval (cases "
        "resampled) and a Wilcoxon signed-rank p; lesions found by each arm, with an exact McNemar p. An "
        "interval that holds 0 means the demo cannot tell the arms apart.",
        "",
        f"Quality control kept: {kept} of the synthetic tumors during training.",
        "",
        *([baseline_markdown([seed], config.fair()), ""] if seed and seed.get("baseline") else []),
        *audit_lines,
        *(
            [contrast_markdown([seed["contrast"]]), ""]
            if seed
            and seed.get("contrast", {}).get("real_hu") is not None
            and "generator_hu_contrast" in seed["contrast"]
            else []
        ),
        "Lesion sensitivity counts a test lesion found when any predicted tumor voxel overlaps it; "
        "'<= 10 mm' is lesions with an equivalent-sphere radius of at most 10 mm. Per-case and per-lesion "
        "figures: `eval/<model>/metrics_per_case.csv`, `metrics_per_lesion.csv`, `summary.md`.",
        "",
        "This is a phantom world: it shows every stage working and how large each effect is, with its "
        "uncertainty, when real tumor labels are few. It does not measure accuracy on real CT. "
        "`python benchmarks/fair_toy.py` runs the same design over three seeds with more cases.",
        "",
        "## Time (seconds)",
        "",
        "| " + " | ".join(result.seconds) + " |",
        "|" + "---|" * len(result.seconds),
        "| " + " | ".join(f"{s:.0f}" for s in result.seconds.values()) + " |",
        "",
        "## Pictures",
        "",
    ]
    for title, path in images:
        if (result.out_dir / path).is_file():
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    return "\n".join(lines)
