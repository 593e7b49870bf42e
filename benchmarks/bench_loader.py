"""The training data path on realistic CTs: crops per second from the case store against the raw files.

Phantom CTs of 512×512×160 (0.78 × 0.78 × 2.5 mm) and 512×512×300 (0.78 × 0.78 × 1 mm), int16
``.nii.gz`` as nibabel reads them (Fortran-ordered), prepared as a LiTS-style tumor dataset and a
BTCV-style organ-only dataset. The loader is train-seg's for ``--organ liver --task freesyn``: 4 crops of
96³ per volume (positive:negative 1:1), a rule-based tumor in every crop with liver and no real tumor,
the method's augmentation.

Prints, on this machine:
- the store's build time and size per case (one worker);
- crops/s of the raw path (decode, reorient, resample, window, crop per sample) and of the store path,
  with 1 and W loader workers, steady state (the first batches excluded), and the store's gain per volume;
- with ``--startup``: the time to the first optimizer step and the extra memory of train-seg on a
  data list of 100,000 cases (a few stored cases repeated).

Run: python benchmarks/bench_loader.py [--quick] [--workers W] [--startup]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from freetumor_cli.core.io import save_volume
from freetumor_cli.core.phantom import make_phantom
from freetumor_cli.core.prepare import PrepareConfig, prepare, read_manifest
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.seg_data import CropDataset, Pipeline, crop_transforms
from freetumor_cli.core.store import CaseSource, open_store
from freetumor_cli.core.training import make_loader

CTS = (((512, 512, 160), (0.78, 0.78, 2.5)), ((512, 512, 300), (0.78, 0.78, 1.0)))


def write_data_root(
    root: Path, copies: int, cts: tuple[tuple[tuple[int, int, int], tuple[float, float, float]], ...] = CTS
) -> None:
    """``copies`` × ``cts``: the first CT of each copy LiTS-style (liver and one tumor), the others BTCV-style."""
    for i in range(copies):
        for j, (shape, spacing) in enumerate(cts):
            p = make_phantom(shape, spacing, seed=10 * i + j, tumors={"liver": 1 if j == 0 else 0})
            ct = np.asfortranarray(p.ct.array.astype(np.int16))
            if j == 0:  # LiTS-style: liver and tumor labels only
                labels = np.where(np.isin(p.labels.array, [1, 2]), p.labels.array, 0).astype(np.uint8)
                folder, name = root / "Dataset003_Liver", f"liver_{i}"
                save_volume(ct, p.ct, folder / "imagesTr" / f"{name}_0000.nii.gz")
                save_volume(labels, p.ct, folder / "labelsTr" / f"{name}.nii.gz", label=True)
            else:
                folder, number = root / "BTCV", i * len(cts) + j
                save_volume(ct, p.ct, folder / "imagesTr" / f"img{number:04d}.nii.gz")
                save_volume(p.labels.array, p.ct, folder / "labelsTr" / f"label{number:04d}.nii.gz", label=True)


def crops_per_second(dataset: CropDataset, workers: int, batches: int, warmup: int) -> float:
    loader = make_loader(dataset, batch_size=1, workers=workers, seed=0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    crops = 0
    for _ in range(batches):
        crops += next(it)["image"].shape[0]
    seconds = time.perf_counter() - t0
    del it
    return crops / seconds


class Started(Exception):
    """The first step ran: the start-up is over."""


def _status_kb(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _private_kb(pid: int | str) -> int:
    """Memory only this process holds (not the pages it shares with its parent after the fork)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def startup_run(prepared: Path, tmp: Path, cases: int) -> dict[str, float]:
    """train-seg on a data list of ``cases`` entries, in this (fresh) process: time and memory at the first step."""
    from freetumor_cli.core.train_seg import TrainSegConfig, train_segmentation

    big = tmp / f"list_{cases}"
    (big / "datalists").mkdir(parents=True)
    stored = read_manifest(prepared)
    liver = [r for r in stored if r["dataset"] == "Dataset003_Liver"]
    organ_only = [r for r in stored if r["dataset"] == "BTCV"]
    keys = ("image", "label", "case", "dataset")
    labelled = max(1, cases // 10)
    training = [
        {**{k: liver[i % len(liver)][k] for k in keys}, "role": "tumor-labelled", "fold": 1} for i in range(labelled)
    ]
    training += [
        {**{k: organ_only[i % len(organ_only)][k] for k in keys}, "role": "organ-only", "fold": 1}
        for i in range(cases - labelled)
    ]
    (big / "datalists" / "liver_fold0.json").write_text(json.dumps({"training": training, "validation": []}))
    (big / "store.json").write_text(json.dumps({"path": str((prepared / "store").resolve())}))
    del training, stored
    import gc

    gc.collect()
    figures: dict[str, float] = {"rss_before_mb": _status_kb("self", "VmRSS") / 1024}
    t0 = time.perf_counter()

    def first_step(step: int, _total: int, _stats: dict[str, float]) -> None:
        if step == 1:
            figures["seconds"] = time.perf_counter() - t0
            figures["rss_mb"] = _status_kb("self", "VmRSS") / 1024
            workers = _children(os.getpid())
            figures["worker_private_mb"] = max((_private_kb(w) for w in workers), default=0) / 1024
            raise Started

    config = TrainSegConfig(task="liver", mode="freesyn", model="unet", max_steps=1, workers=2, labelled_repeats=10)
    with contextlib.suppress(Started):
        train_segmentation(big, tmp / f"run_{cases}", config, on_step=first_step)
    return figures


def startup(prepared: Path, tmp: Path, cases: int) -> None:
    """Start-up of train-seg on ``cases`` against 100 cases, each in a fresh process: the difference is
    what the data list's size costs."""
    import subprocess
    import sys

    results = {}
    for n in (100, cases):
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_loader as b; from pathlib import Path; "
            "print('RESULT', json.dumps(b.startup_run(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(prepared), str(tmp), str(n)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[n] = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])
    small, big = results[100], results[cases]
    print(
        f"\nstart-up of train-seg (freesyn, labelled ×10, 2 workers) on a data list of {cases:,} cases: first "
        f"optimizer step after {big['seconds']:.1f} s (100 cases: {small['seconds']:.1f} s); main process "
        f"{big['rss_mb'] - big['rss_before_mb']:.0f} MB over its start (100 cases: "
        f"{small['rss_mb'] - small['rss_before_mb']:.0f} MB); each loader worker {big['worker_private_mb']:.0f} MB "
        f"of its own (100 cases: {small['worker_private_mb']:.0f} MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and batches")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="the W of the multi-worker runs")
    parser.add_argument("--startup", action="store_true", help="also time train-seg's start on 100,000 cases")
    parser.add_argument("--cases", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        root, prepared = tmp / "data", tmp / "prepared"
        t0 = time.perf_counter()
        write_data_root(root, 1 if args.quick else 2)
        print(f"phantom CTs written in {time.perf_counter() - t0:.0f} s")
        result = prepare(root, prepared, PrepareConfig(folds=2))
        assert result.store is not None
        built = result.store.built
        raw_mb = sum(os.path.getsize(r["image"]) for r in read_manifest(prepared)) / 2**20 / built
        print(
            f"case store: {built} cases in {result.store.seconds:.1f} s ({result.store.seconds / built:.1f} s per case, one worker), "
            f"{result.store.bytes / 2**20 / built:.1f} MB per case on disk (the .nii.gz CTs: {raw_mb:.1f} MB)"
        )
        preprocessing = Preprocessing.for_region("abdomen")
        store = open_store(prepared, preprocessing)
        entries = read_manifest(prepared) * 64
        pipeline = Pipeline(task="liver", preprocessing=preprocessing, roi=(96, 96, 96), synthesize=True)
        raw = CropDataset(entries, CaseSource(preprocessing, None), pipeline, crop_transforms(pipeline), seed=0)
        stored = CropDataset(entries, CaseSource(preprocessing, store), pipeline, crop_transforms(pipeline), seed=0)
        # The share of crops that got a synthetic tumor, from a few samples.
        sample = [c for i in range(4) for c in stored[i]]
        synthesized = sum(bool(c["synth_mask"].any()) for c in sample)
        print(f"{synthesized} of {len(sample)} sampled crops got a synthetic tumor")
        rates: dict[tuple[str, int], float] = {}
        for workers in sorted({1, args.workers}):
            rates["raw", workers] = crops_per_second(raw, workers, 2 * workers if args.quick else 3 * workers, workers)
            rates["store", workers] = crops_per_second(
                stored, workers, 10 * workers if args.quick else 25 * workers, 2 * workers
            )
            print(
                f"{workers} worker(s): raw files {rates['raw', workers]:.2f} crops/s, case store {rates['store', workers]:.1f} crops/s "
                f"({rates['store', workers] / rates['raw', workers]:.0f}× per volume)"
            )
        if args.startup:
            startup(prepared, tmp, args.cases)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
