"""Speed of ``freetumor prepare``.

Prints:
1. cases per second for scanning + validation over a data root of small cases (default 1,200), with
   1 and 2 worker processes (image headers only, label data read, as by default);
2. preprocessing throughput (resample to 1.5 mm, window, crop; MONAI transforms) on phantom CTs of a
   realistic size, with 1 and 2 workers.

Run: python benchmarks/bench_prepare.py [--cases N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from freetumor_cli.core.io import save_volume
from freetumor_cli.core.phantom import make_phantom
from freetumor_cli.core.prepare import PrepareConfig, build_case_store, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1200)
    parser.add_argument("--quick", action="store_true", help="fewer preprocessing cases")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        p = make_phantom((64, 64, 40), (6.0, 6.0, 6.0), seed=0, tumors=1)
        image = save_volume(p.ct.array, p.ct, Path(tmp) / "img.nii.gz")
        label = save_volume(
            np.where(np.isin(p.labels.array, [1, 2]), p.labels.array, 0), p.ct, Path(tmp) / "lab.nii.gz", label=True
        )
        datasets = ["Dataset003_Liver", "Flare22", "WORD", "Amos2022"]
        for i in range(args.cases):
            folder = root / datasets[i % len(datasets)]
            (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
            (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, folder / "imagesTr" / f"case{i:06d}_0000.nii.gz")
            shutil.copyfile(label, folder / "labelsTr" / f"case{i:06d}.nii.gz")
        print(f"data root: {args.cases} cases of 64x64x40 in {len(datasets)} datasets")
        for workers in (1, 2):
            t0 = time.perf_counter()
            result = prepare(root, Path(tmp) / f"out{workers}", PrepareConfig(), workers=workers)
            seconds = time.perf_counter() - t0
            print(
                f"  scan + validate + write lists, {workers} worker(s): {result.valid / seconds:.0f} cases/s ({seconds:.1f} s, {result.valid} usable)"
            )

        n = 4 if args.quick else 8
        root2 = Path(tmp) / "data2"
        for i in range(n):
            q = make_phantom((256, 256, 120), (1.2, 1.2, 2.5), seed=i, tumors=1)
            save_volume(q.ct.array, q.ct, root2 / "Dataset003_Liver" / "imagesTr" / f"liver_{i}_0000.nii.gz")
            save_volume(
                np.where(np.isin(q.labels.array, [1, 2]), q.labels.array, 0),
                q.ct,
                root2 / "Dataset003_Liver" / "labelsTr" / f"liver_{i}.nii.gz",
                label=True,
            )
        for workers in (1, 2):
            out = Path(tmp) / f"pp{workers}"
            config = PrepareConfig(store=False)
            prepare(root2, out, config)
            _, built = build_case_store(out, config, workers=workers)
            print(
                f"  case store of {built.built} CTs of 256x256x120 at 1.2x1.2x2.5 mm, at 1.5 mm, {workers} worker(s): "
                f"{built.built / built.seconds:.2f} cases/s ({built.seconds:.1f} s; {built.bytes / 2**20:.0f} MB)"
            )


if __name__ == "__main__":
    main()
