"""The demo's comparison over several seeds: does training with synthetic tumors beat the baseline?

Each seed builds its own phantom world (different patients, tumors and test set) and runs the whole
demo pipeline (``freetumor_cli.core.demo.run_demo``). Prints one row per seed, then mean and standard
deviation per model, and the mean paired difference of each freesyn run minus the baseline.

    python benchmarks/toy_world.py --seeds 0 1 2 [--quick] [--out toy_world]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from freetumor_cli.core.demo import COMPARISON_COLUMNS, MODELS, DemoConfig, run_demo


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="the demo's quick preset")
    parser.add_argument("--out", type=Path, default=Path("toy_world"))
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        started = time.perf_counter()
        result = run_demo(args.out / f"seed_{seed}", DemoConfig.preset(quick=args.quick, seed=seed))
        minutes = (time.perf_counter() - started) / 60
        rows.append({"seed": seed, "minutes": minutes, "qc": result.qc_acceptance, **result.comparison})
        cells = "  ".join(
            f"{name}: " + ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} n/a" for c, v in row.items())
            for name, row in result.comparison.items()
        )
        qc = "n/a" if result.qc_acceptance is None else f"{result.qc_acceptance:.0%}"
        print(f"seed {seed}: {minutes:.1f} min, QC kept {qc}; {cells}", flush=True)

    print()
    print("| model | " + " | ".join(COMPARISON_COLUMNS) + " |")
    print("|---|" + "---|" * len(COMPARISON_COLUMNS))
    for name in MODELS:
        cells = [_mean_sd([r[name][c] for r in rows if r[name][c] is not None]) for c in COMPARISON_COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name in [m for m in MODELS if m != "baseline"]:
        diffs = [
            _mean_sd([r[name][c] - r["baseline"][c] for r in rows if None not in (r[name][c], r["baseline"][c])])
            for c in COMPARISON_COLUMNS
        ]
        print(f"| {name} - baseline | " + " | ".join(diffs) + " |")
    print(f"\n{len(rows)} seeds, {statistics.fmean(r['minutes'] for r in rows):.1f} min per seed")
    (args.out / "toy_world.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
