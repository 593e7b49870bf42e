"""Speed of ``freetumor evaluate``.

Prints:
1. one 512×512×300 case with five tumors of different sizes: seconds to score it (all metrics, one
   tumor class and the three default tumor classes), reading the files included and excluded;
2. cases per second over a folder of smaller cases, with 1 and 2 workers.

Run: python benchmarks/bench_evaluate.py [--quick]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from freetumor_cli.core.cases import CasePair  # noqa: E402
from freetumor_cli.core.evaluate import EvaluateConfig, evaluate, evaluate_case  # noqa: E402
from freetumor_cli.core.io import Volume, save_volume  # noqa: E402


def big_case(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> tuple[Volume, np.ndarray, np.ndarray]:
    """A liver-sized organ with five tumors (radius 3 to 30 mm); the prediction shifts and misses some."""
    gt = np.zeros(shape, np.uint8)
    axes = [(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing, strict=True)]
    organ_box = tuple(slice(n // 4, 3 * n // 4) for n in shape)
    gt[organ_box] = 1
    pred = gt.copy()
    for k, radius in enumerate((3.0, 6.0, 10.0, 18.0, 30.0)):
        center = [a[int(n * f)] for a, n, f in zip(axes, shape, (0.3 + 0.1 * k, 0.5, 0.5), strict=True)]
        box = tuple(
            slice(max(0, int(np.searchsorted(a, c - radius - 3))), int(np.searchsorted(a, c + radius + 3)))
            for a, c in zip(axes, center, strict=True)
        )
        x, y, z = np.meshgrid(*(a[b] for a, b in zip(axes, box, strict=True)), indexing="ij")
        ball = (x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2 <= radius**2
        gt[box][ball] = 2
        if k != 1:  # the prediction misses the second tumor and is 1 voxel off on the others
            pred[box][np.roll(ball, 1, axis=0)] = 2
    fp = tuple(slice(int(n * 0.62), int(n * 0.62) + 4) for n in shape)
    pred[fp] = 2
    affine = np.diag([*spacing, 1.0])
    return Volume(np.zeros(shape, np.int16), affine), gt, pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 512x512x100 case and fewer folder cases")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}"
    )
    rng = np.random.default_rng(0)
    shape = (512, 512, 100) if args.quick else (512, 512, 300)
    with tempfile.TemporaryDirectory() as tmp:
        ref, gt, pred = big_case(shape, (0.78, 0.78, 1.0), rng)
        gt_path = save_volume(gt, ref, Path(tmp) / "gt" / "case.nii.gz", label=True)
        pred_path = save_volume(pred, ref, Path(tmp) / "pred" / "case.nii.gz", label=True)
        del gt, pred
        pair = CasePair("case", gt_path, pred_path)
        for classes in (("liver_tumor",), ()):
            config = EvaluateConfig(classes=classes)
            t0 = time.perf_counter()
            scores = evaluate_case(pair, config)
            total = time.perf_counter() - t0
            from freetumor_cli.core.io import load_volume

            t0 = time.perf_counter()
            load_volume(gt_path), load_volume(pred_path)
            io = time.perf_counter() - t0
            row = scores.rows[0]
            label = "1 class (liver_tumor)" if classes else "3 default tumor classes"
            print(
                f"{'x'.join(map(str, shape))} case, 5 tumors, {label}: {total:.2f} s with reading, "
                f"{total - io:.2f} s scoring alone (reading both files {io:.2f} s); "
                f"liver_tumor Dice {row['dice']:.3f}, HD95 {row['hd95_mm']:.1f} mm, lesions TP {row['tp_lesions']} FN {row['fn_lesions']} FP {row['fp_lesions']}"
            )

        folder_cases = 8 if args.quick else 24
        for i in range(folder_cases):
            ref, gt, pred = big_case((192, 192, 96), (1.5, 1.5, 1.5), rng)
            pred = np.where(ndimage.binary_dilation(pred == 2) & (gt > 0), 2, pred).astype(np.uint8)
            save_volume(gt, ref, Path(tmp) / "fgt" / f"c{i:03d}.nii.gz", label=True)
            save_volume(pred, ref, Path(tmp) / "fpred" / f"c{i:03d}.nii.gz", label=True)
        for workers in (1, 2):
            t0 = time.perf_counter()
            cases, _, _ = evaluate(Path(tmp) / "fpred", Path(tmp) / "fgt", replace(EvaluateConfig()), workers=workers)
            seconds = time.perf_counter() - t0
            print(
                f"folder of {len(cases)} cases 192x192x96 (3 tumor classes), {workers} worker(s): {len(cases) / seconds:.1f} cases/s"
            )


if __name__ == "__main__":
    main()
