"""How long the paired experiment's baseline must train: its learning curve on a development world.

The world is built like the experiment's (``freetumor_cli.core.fair``) from a seed the experiment never
reports (99 by default), with a test set of its own; so choosing ``FairConfig.baseline_steps`` from this
curve involves neither the reported seeds nor their test sets. Each point is a separate run with its own
warm-up and cosine schedule (what a run of that length does), scored on the development test set.
Resumable: a rerun skips the points it has.

    python benchmarks/fair_plateau.py [--out fair_plateau] [--steps 500 1000 2000 3000] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from freetumor_cli.core import fair
from freetumor_cli.core.prepare import PrepareConfig, prepare
from freetumor_cli.core.preprocess import PreprocessConfig
from freetumor_cli.core.synthesis_config import SynthesisConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("fair_plateau"))
    parser.add_argument("--steps", type=int, nargs="+", default=[500, 1000, 2000, 3000])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--seed", type=int, default=99, help="the development world's seed (never a reported one)")
    parser.add_argument("--test-cases", type=int, default=8)
    args = parser.parse_args()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    # The experiment's world, with only the organ-only cases a baseline does not use trimmed.
    config = replace(fair.FairConfig(), organ_only_cases=2, test_cases=args.test_cases)
    world = fair.make_world(args.out, config, args.seed)
    prepared = args.out / "prepared"
    if not (prepared / "datalists" / "liver_fold0.json").is_file():
        preprocessing = PreprocessConfig(abdomen_spacing_mm=config.spacing_mm)
        prepare(world["data"], prepared, PrepareConfig(folds=5, seed=args.seed, preprocessing=preprocessing))
        fair._train_everything_labelled(prepared)
    rules = replace(SynthesisConfig(), mix_sizes=fair.sizes_for_crop(config.roi, config.spacing_mm[0]))
    rows = []
    for lr in args.lr:
        for steps in args.steps:
            name = f"{steps}_{lr:g}"
            run = args.out / "runs" / name
            started = time.perf_counter()
            warmup = 0.1 * steps / config.labelled_cases  # as the experiment counts it
            seg = fair._seg(config, args.seed, mode="onlylabeled", steps=steps, lr=lr, warmup=warmup, rules=rules)
            fair._train(prepared, run, seg, None)
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
            dice, lesions = fair.read_scores(fair._evaluate(run, world, args.out / "eval" / name))
            rows.append({
                "steps": steps, "lr": lr, "seconds": round(time.perf_counter() - started, 1),
                "loss_fifth_before": summary["loss_fifth_before"], "loss_last_fifth": summary["loss_last_fifth"],
                "dice": float(np.mean(list(dice.values()))),
                "sensitivity": float(np.mean([found for found, _ in lesions.values()])),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print("\n| steps | lr | loss, fifth before → last fifth | dev tumor Dice | dev lesion sens. |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['lr']:g} | {r['loss_fifth_before']:.3f} → {r['loss_last_fifth']:.3f} | "
              f"{r['dice']:.3f} | {r['sensitivity']:.3f} |")  # fmt: skip
    (args.out / "plateau.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
