"""How long the paired experiment's baseline must train: its learning curve on a development world.

The world is built like the experiment's (``freetumor_cli.core.fair``) from a seed the experiment never
reports (99 by default), with a test set of its own; so choosing ``FairConfig.baseline_steps`` from this
curve involves neither the reported seeds nor their test sets. Each point is a separate run with its own
warm-up and cosine schedule (what a run of that length does), scored on the development test set (the
mean of the CTs' tumor Dice and the Dice pooled over their tumor voxels) and on the development world's
calibration CTs (the measure of the experiment's baseline check, ``FairConfig.plateau_dice``, whose floor
comes from this curve). Resumable: a rerun skips the points it has.

    python benchmarks/fair_plateau.py [--out fair_plateau] [--steps 500 1000 2000 3000] [--lr 1e-3]

``--generator`` chooses the generator's steps and learning rate the same way: on the development world
(with its organ-only cases), one baseline of the experiment's length as critic, then per (steps, lr) a
generator and an arm D (generator tumors with quality control) from the baseline (after the experiment's
plateau check), scored on the development test set beside arm C (rule-based tumors). The rule, fixed before any reported result: the
highest development Dice of D (ties: fewer steps). It also prints each generator's held-out contrast, halo
and QC pass rate.

    python benchmarks/fair_plateau.py --generator [--steps 150 300] [--lr 1e-4 3e-4 1e-3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from freetumor_cli.core import fair
from freetumor_cli.core.errors import FreetumorError
from freetumor_cli.core.outputs import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("fair_plateau"))
    parser.add_argument("--steps", type=int, nargs="+", default=[500, 1000, 2000, 3000])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--seed", type=int, default=99, help="the development world's seed (never a reported one)")
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--generator", action="store_true", help="choose the generator's steps and learning rate")
    args = parser.parse_args()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    if args.generator:
        generator_sweep(args)
        return
    # The experiment's world, with only the organ-only cases a baseline does not use trimmed.
    config = replace(fair.FairConfig(), organ_only_cases=2, test_cases=args.test_cases)
    try:
        world, prepared = fair.prepared_world(args.out, config, args.seed)
    except FreetumorError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    rows = []
    for lr in args.lr:
        for steps in args.steps:
            name = f"{steps}_{lr:g}"
            run = args.out / "runs" / name
            seg = fair.baseline_config(replace(config, baseline_steps=steps, lr=lr), args.seed)
            fair.train_run(prepared, run, seg, None)
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
            scored = fair.score_run(run, world, args.out / "eval" / name)
            dice, lesions = fair.read_scores(scored)
            calibration = world["calibration"]
            calibrated = fair.score_checkpoint(
                run / "checkpoints" / "last", calibration / "imagesTr", calibration / "labelsTr",
                args.out / "eval" / "calibration" / name,
            )  # fmt: skip
            rows.append({
                "steps": steps, "lr": lr, "train_seconds": summary.get("seconds"),
                "loss_fifth_before": summary["loss_fifth_before"], "loss_last_fifth": summary["loss_last_fifth"],
                "dice": float(np.mean(list(dice.values()))),
                "sensitivity": float(np.mean([found for found, _ in lesions.values()])),
                "pooled_dice": fair.pooled_dice(scored),
                "calibration_case_mean": float(np.mean(list(fair.read_scores(calibrated)[0].values()))),
                "calibration_dice": fair.pooled_dice(calibrated),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| steps | lr | training s | loss, fifth before → last fifth | dev tumor Dice, case mean / pooled "
        "| dev lesion sens. | calibration Dice, case mean / pooled |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['lr']:g} | {r['train_seconds']} | {r['loss_fifth_before']:.3f} → {r['loss_last_fifth']:.3f} | "
              f"{r['dice']:.3f} / {r['pooled_dice']:.3f} | {r['sensitivity']:.3f} | "
              f"{r['calibration_case_mean']:.3f} / {r['calibration_dice']:.3f} |")  # fmt: skip
    write_text_atomic(args.out / "plateau.json", json.dumps(rows, indent=1) + "\n")


def generator_sweep(args: argparse.Namespace) -> None:
    """Per (steps, lr): a generator, then arm D from the baseline; arm C once; all on the development world."""
    steps_grid = args.steps if args.steps != [500, 1000, 2000, 3000] else [150, 300]
    lr_grid = args.lr if args.lr != [1e-3] else [1e-4, 3e-4, 1e-3]
    config = replace(fair.FairConfig(), test_cases=args.test_cases, audit_cases=0)
    out = args.out / "generator"
    try:
        world, prepared = fair.prepared_world(out, config, args.seed)
    except FreetumorError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    runs, rules = out / "runs", fair.crop_rules(config)
    checked = fair.trained_baseline(out, world, prepared, config, args.seed, step=print)
    fair.follow_baseline(runs, checked["run"], print)  # arm C and the grid continue from the accepted one
    baseline = runs / checked["run"] / "checkpoints" / "last"
    print(json.dumps({"baseline check": checked}), flush=True)

    def arm(name: str, synth: str) -> dict[str, float]:
        seg = fair._seg(config, args.seed, mode="freesyn", steps=config.arm_steps, lr=config.arm_lr, warmup=0.0,
                        synth=synth, init=str(baseline), rules=rules)  # fmt: skip
        fair.train_run(prepared, runs / name, seg, baseline)
        dice, lesions = fair.read_scores(fair.score_run(runs / name, world, out / "eval" / name))
        return {"dice": float(np.mean(list(dice.values()))),
                "sensitivity": float(np.mean([found for found, _ in lesions.values()]))}  # fmt: skip

    reference = arm("C", "rules")
    print(json.dumps({"arm C": reference}), flush=True)
    rows = []
    for lr in lr_grid:
        for steps in steps_grid:
            name = f"gen_{steps}_{lr:g}"
            chosen = replace(config, synth_steps=steps, synth_lr=lr)
            started = time.perf_counter()
            fair.train_generator_run(prepared, runs / name, chosen, args.seed, baseline)
            seconds = round(time.perf_counter() - started, 1)
            measures = fair.generator_measures(runs / name)
            scores = arm(f"D_{steps}_{lr:g}", str(runs / name / "checkpoints" / "last"))
            rows.append({"steps": steps, "lr": lr, "generator_seconds": seconds, **measures, **scores})
            print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: (r["dice"], -r["steps"]))
    print(f"\narm C (rules, QC) on the development test set: Dice {reference['dice']:.3f}, "
          f"lesion sens. {reference['sensitivity']:.3f}")  # fmt: skip
    print(
        "\n| steps | lr | generator s | held-out contrast HU (rules) | halo (rules) | QC pass | dev Dice of D | dev sens. of D |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['lr']:g} | {r['generator_seconds']} | {r['generator_hu_contrast']:+.0f} "
              f"({r['rules_hu_contrast']:+.0f}) | {r['generator_halo']:.2f} ({r['rules_halo']:.2f}) | "
              f"{r['generator_qc_pass_rate']:.0%} | {r['dice']:.3f} | {r['sensitivity']:.3f} |")  # fmt: skip
    print(f"\nchosen: {best['steps']} steps at lr {best['lr']:g} (the highest development Dice of D)")
    write_text_atomic(out / "generator_sweep.json", json.dumps({"arm_C": reference, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
