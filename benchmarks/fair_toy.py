"""What synthetic tumors, quality control and the generator each add: the fair, paired experiment.

Per seed a phantom world, one shared baseline, a generator, and arms A, A′ (Ap), B, C, C′ (Cp), D, E (a
subset with ``--arms``) that continue from the baseline for the same steps; then paired statistics pooled
over seeds with each seed's difference, the tumors' contrast and halo, and a quality-control audit (see
``freetumor_cli.core.fair``). Resumable: a rerun skips what is done.

    python benchmarks/fair_toy.py [--quick] [--out fair_toy] [--seeds 0 1 2] [--arms A Ap B C Cp D E]

``--quick`` runs every stage in a few minutes (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from freetumor_cli.core.errors import FreetumorError
from freetumor_cli.core.fair import ARMS, FairConfig, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every stage, tiny (its figures mean nothing)")
    parser.add_argument("--out", type=Path, default=Path("fair_toy"))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS))
    args = parser.parse_args()
    for category in (FutureWarning, DeprecationWarning, UserWarning):  # the libraries' notices to developers
        warnings.filterwarnings("ignore", category=category)
    config = FairConfig.quick() if args.quick else FairConfig()
    if args.seeds:
        config = replace(config, seeds=tuple(args.seeds))
    if args.arms:
        config = replace(config, arms=tuple(args.arms))
    started = time.perf_counter()
    try:
        text = run_experiment(
            args.out, config, step=lambda m: print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {m}", flush=True)
        )
    except FreetumorError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print()
    print(text)
    print(f"\n{(time.perf_counter() - started) / 60:.1f} minutes; tables in {args.out / 'fair_toy.md'}")


if __name__ == "__main__":
    main()
