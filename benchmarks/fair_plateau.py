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
import sys
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
    args = parser.parse_args()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
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
            dice, lesions = fair.read_scores(fair.score_run(run, world, args.out / "eval" / name))
            rows.append({
                "steps": steps, "lr": lr, "train_seconds": summary.get("seconds"),
                "loss_fifth_before": summary["loss_fifth_before"], "loss_last_fifth": summary["loss_last_fifth"],
                "dice": float(np.mean(list(dice.values()))),
                "sensitivity": float(np.mean([found for found, _ in lesions.values()])),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print("\n| steps | lr | training s | loss, fifth before → last fifth | dev tumor Dice | dev lesion sens. |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['lr']:g} | {r['train_seconds']} | {r['loss_fifth_before']:.3f} → {r['loss_last_fifth']:.3f} | "
              f"{r['dice']:.3f} | {r['sensitivity']:.3f} |")  # fmt: skip
    write_text_atomic(args.out / "plateau.json", json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
