"""nnU-Net's training loader with and without freetumor's online tumors: patches/s, and synthesis's share.

Phantom CTs of 512×512×160 (0.78 × 0.78 × 2.5 mm, int16 ``.nii.gz``), two LiTS-style (liver and a tumor)
and two BTCV-style (organs only), prepared by freetumor, written as a raw nnU-Net dataset by
``freetumor nnunet dataset``, planned and preprocessed by nnU-Net's own ``nnUNetv2_plan_and_preprocess``
(3d_fullres). Then nnU-Net's training loader, built by the trainers themselves (``get_dataloaders``)
with ``nnUNet_n_proc_DA=0``: the loading and augmentation of one worker, in this process. The same
batches (same seeds) are drawn by ``nnUNetTrainer`` and by ``nnUNetTrainerFreeTumor``; the share is the
time inside the tumor transform over the loader's time with it.

The two loaders take turns (``--rounds``), so that a busy machine slows both alike. Prints the plans'
patch, the patches/s of both loaders (median of the rounds) and their CPU time per patch, the share of
the loader's CPU time spent in synthesis, and how many patches got a tumor.

Run: python benchmarks/bench_nnunet.py [--batches 10] [--rounds 4] [--work DIR (kept: a rerun skips the preprocessing)]
Needs the nnunet extra (pip install torch==2.13.0 -e ".[nnunet]").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import write_data_root

DATASET = "Dataset990_FreeTumorBench"
CT = ((512, 512, 160), (0.78, 0.78, 2.5))


def build(work: Path, env: dict[str, str]) -> None:
    """The raw dataset and nnU-Net's preprocessing of it, unless ``work`` has them."""
    from freetumor_cli.core.nnunet import write_nnunet_dataset
    from freetumor_cli.core.prepare import PrepareConfig, prepare

    if (work / "preprocessed" / DATASET / "nnUNetPlans.json").is_file():
        return
    t0 = time.perf_counter()
    write_data_root(work / "data", copies=2, cts=(CT, CT))
    prepare(work / "data", work / "prepared", PrepareConfig(store=False))
    write_nnunet_dataset(work / "prepared", work / "raw", DATASET)
    print(f"4 phantom CTs written and prepared in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    command = [
        str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"),
        *("-d", DATASET[7:10], "-c", "3d_fullres", "-np", "2", "-npfp", "2"),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"nnUNetv2_plan_and_preprocess failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    print(f"nnUNetv2_plan_and_preprocess: {time.perf_counter() - t0:.0f} s")


class Timed:
    """Wraps a transform's ``apply``, adding up its wall-clock and CPU seconds."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform
        self.seconds = self.cpu_seconds = 0.0
        inner = transform.apply

        def apply(data_dict: dict[str, Any], **params: Any) -> dict[str, Any]:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return inner(data_dict, **params)
            finally:
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.process_time() - c0

        transform.apply = apply


def training_loader(trainer_class: Any, work: Path) -> tuple[Any, Any, Timed | None]:
    """``trainer_class``'s training loader (and its tumor transform's timer), built by the trainer itself."""
    from freetumor_cli.core.nnunet_trainer import TumorSynthesisTransform

    pre = work / "preprocessed" / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = False
    trainer = trainer_class(plans, "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    np.random.seed(0)  # both loaders cut the same patches and augment them alike: the tumors aside
    torch.manual_seed(0)
    train, _ = trainer.get_dataloaders()
    train.random_state = (np.random.get_state(), torch.get_rng_state())  # its own stream, kept between rounds
    steps = train.data_loader.transforms.transforms
    transform = next((t for t in steps if isinstance(t, TumorSynthesisTransform)), None)
    return trainer, train, Timed(transform) if transform is not None else None


def timed_batches(loader: Any, batches: int) -> tuple[int, float, float]:
    """(patches, wall-clock seconds, CPU seconds) of ``batches`` batches, from the loader's own random stream
    (nnU-Net's augmentation draws from numpy's and torch's global generators)."""
    np.random.set_state(loader.random_state[0])
    torch.set_rng_state(loader.random_state[1])
    t0, c0 = time.perf_counter(), time.process_time()
    patches = sum(int(next(loader)["data"].shape[0]) for _ in range(batches))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    loader.random_state = (np.random.get_state(), torch.get_rng_state())
    return patches, seconds, cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=10, help="batches per loader and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the two loaders taking turns")
    parser.add_argument("--warmup", type=int, default=2, help="batches drawn first, not timed")
    parser.add_argument("--work", type=Path, default=None, help="working folder, kept (default: a temporary one)")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_nnunet_") as scratch:
        work = args.work or Path(scratch)
        env = {
            **os.environ,
            "nnUNet_raw": str(work / "raw"),
            "nnUNet_preprocessed": str(work / "preprocessed"),
            "nnUNet_results": str(work / "results"),
            "nnUNet_n_proc_DA": "0",  # the loading and augmentation of one worker, in this process
        }
        os.environ.update(env)  # nnU-Net reads its folders when it is imported
        build(work, env)
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        from freetumor_cli.core.nnunet_trainer import nnUNetTrainerFreeTumor

        torch.set_num_threads(1)
        loaders = {
            name: training_loader(cls, work)
            for name, cls in (("plain", nnUNetTrainer), ("tumors", nnUNetTrainerFreeTumor))
        }
        for _, loader, _ in loaders.values():
            timed_batches(loader, args.warmup)
        trainer, _, timer = loaders["tumors"]
        assert timer is not None
        transform = timer.transform
        timer.seconds = timer.cpu_seconds = 0.0
        transform.patches = transform.synthesized = 0
        rates: dict[str, list[float]] = {"plain": [], "tumors": []}
        cpu: dict[str, float] = {"plain": 0.0, "tumors": 0.0}
        count: dict[str, int] = {"plain": 0, "tumors": 0}
        for _ in range(args.rounds):
            for name, (_, loader, _) in loaders.items():
                patches, seconds, cpu_seconds = timed_batches(loader, args.batches)
                rates[name].append(patches / seconds)
                cpu[name] += cpu_seconds
                count[name] += patches
    patch = [int(n) for n in trainer.configuration_manager.patch_size]
    print(f"3d_fullres patch {patch}, batch size {trainer.batch_size}, {count['tumors']} patches timed per loader")
    for name, label in (("plain", "nnUNetTrainer"), ("tumors", "nnUNetTrainerFreeTumor")):
        print(
            f"{label + ' loader:':31s} {float(np.median(rates[name])):6.2f} patches/s (median of {args.rounds} rounds: "
            f"{', '.join(f'{r:.2f}' for r in rates[name])}), {cpu[name] / count[name] * 1000:.0f} ms of CPU per patch"
        )
    print(
        f"synthesis: {timer.cpu_seconds / cpu['tumors']:.1%} of the loader's CPU time, "
        f"{timer.cpu_seconds / max(transform.patches, 1) * 1000:.1f} ms of CPU per patch "
        f"({timer.seconds / max(transform.patches, 1) * 1000:.1f} ms wall-clock); "
        f"{transform.synthesized} of {transform.patches} patches got a tumor"
    )


if __name__ == "__main__":
    main()
