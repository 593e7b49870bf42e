"""Speed, memory and realism of the rule-based engine (``freetumor synthesize``).

Prints:
1. seconds per tumor for each size class (one thread, file I/O excluded) on a 128³ liver crop at
   1 mm, a 512×512×100 CT and a 512×512×300 CT (phantoms), the first call listed apart;
2. per call (organ preparation included) on C- and Fortran-ordered arrays, as nibabel returns them;
   the whole ``freetumor synthesize`` command on the 512×512×100 and 512×512×300 CTs, with reading
   and writing, its peak memory, and a plain nibabel load + save of the same files (its floor);
3. realism: mean HU of synthetic liver tumors minus the surrounding liver, per size class, on a phantom
   and on the real case in ../shared/data/totalseg_abdomen (LiTS' real tumors: about -48 HU).

Run: python benchmarks/bench_synthesize.py [--quick]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from freetumor_cli.core.io import Volume, load_volume, save_volume  # noqa: E402
from freetumor_cli.core.phantom import make_phantom  # noqa: E402
from freetumor_cli.core.registry import ORGANS  # noqa: E402
from freetumor_cli.core.synthesis_config import SIZE_CLASSES, SynthesisConfig  # noqa: E402
from freetumor_cli.core.tumor import prepare_organ, synthesize_in_organ  # noqa: E402

LIVER = ORGANS["liver"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_abdomen"


def liver_crop_1mm() -> Volume:
    """A 128³ crop at 1 mm centred on the phantom's liver."""
    phantom = make_phantom((300, 260, 200), (1.0, 1.0, 1.0), seed=0)
    liver = np.argwhere(phantom.labels.array == LIVER.value)
    center = liver.mean(axis=0).astype(int)
    lo = np.clip(center - 64, 0, np.array(phantom.ct.shape) - 128)
    box = tuple(slice(int(a), int(a) + 128) for a in lo)
    ct = phantom.ct.array[box]
    affine = phantom.ct.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    return Volume(np.stack([ct, phantom.labels.array[box]]), affine)


def time_size_classes(name: str, ct: np.ndarray, labels: np.ndarray, affine: np.ndarray, repeats: int) -> None:
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    config = SynthesisConfig()
    organ_mask = labels == LIVER.value
    t0 = time.perf_counter()
    geometry = prepare_organ(organ_mask, LIVER, spacing=spacing, affine=affine, config=config)
    prep = time.perf_counter() - t0
    print(
        f"\n{name}: shape {ct.shape}, spacing {tuple(round(float(s), 2) for s in spacing)} mm, "
        f"liver {geometry.volume_ml:.0f} ml; organ preparation (once per volume) {prep * 1000:.0f} ms"
    )
    print(f"  {'size':<7} {'first call':>11} {'median':>9} {'max':>9}   (ms per tumor, one thread)")
    for size in SIZE_CLASSES:
        times = []
        for seed in range(repeats):
            t0 = time.perf_counter()
            synthesize_in_organ(
                ct,
                organ_mask,
                LIVER,
                spacing=spacing,
                affine=affine,
                rng=np.random.default_rng(seed),
                size=size,
                count=1,
                config=config,
                geometry=geometry,
            )
            times.append(time.perf_counter() - t0)
        ms = np.array(times) * 1000
        print(f"  {size:<7} {ms[0]:>11.1f} {np.median(ms):>9.1f} {ms.max():>9.1f}")


PEAK_PROBE = """
import atexit, runpy, sys

def report():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                sys.stderr.write("PEAK_KB " + line.split()[1] + "\\n")
    except OSError:
        pass

atexit.register(report)
sys.argv = ["freetumor"] + sys.argv[1:]
runpy.run_module("freetumor_cli", run_name="__main__")
"""


def run_command(image: Path, labels: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of one ``freetumor synthesize`` run.

    The peak is the child's own high-water mark (VmHWM), read by the child itself: the rusage of a
    forked child also counts the parent's pages it started with.
    """
    cmd = [
        sys.executable,
        "-c",
        PEAK_PROBE,
        "synthesize",
        "--in",
        str(image),
        "--labels",
        str(labels),
        "--organ",
        "liver",
        "--size",
        "medium",
        "--out",
        str(out),
        "--overwrite",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"command failed: {done.stderr}")
    peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KB")]
    return wall, (peaks[-1] / 1024 if peaks else float("nan"))


def time_memory_orders(ct: np.ndarray, labels: np.ndarray, affine: np.ndarray, repeats: int) -> None:
    """One tumor per call, organ preparation included, on C- and Fortran-ordered arrays (nibabel's)."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    print(f"  memory order, 1 tumor per call incl. organ preparation (ms, median of {repeats}):")
    for size in ("tiny", "medium"):
        row = []
        for order in ("C", "F"):
            image, mask = np.asarray(ct, order=order), np.asarray(labels == LIVER.value, order=order)
            times = []
            for seed in range(repeats):
                t0 = time.perf_counter()
                synthesize_in_organ(
                    image, mask, LIVER, spacing=spacing, affine=affine, rng=np.random.default_rng(seed), size=size
                )
                times.append(time.perf_counter() - t0)
            row.append(f"{order} {np.median(times) * 1000:6.1f}")
        print(f"    {size:<7} " + "   ".join(row))


FLOOR = """
import sys, nibabel as nib, numpy as np
ct, lab = nib.load(sys.argv[1]), nib.load(sys.argv[2])
a, b = np.asanyarray(ct.dataobj), np.asanyarray(lab.dataobj)
nib.Nifti1Image(a, ct.affine, ct.header).to_filename(sys.argv[3] + "/floor_ct.nii.gz")
nib.Nifti1Image(b, lab.affine, lab.header).to_filename(sys.argv[3] + "/floor_label.nii.gz")
"""


def load_save_floor(image: Path, labels: Path, out: Path) -> tuple[float, float]:
    """Seconds of a plain nibabel load of the CT and labels and a save of both (the command's floor):
    as a program of its own (the same interpreter start-up as the command), and within this process."""
    import nibabel as nib

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR, str(image), str(labels), str(out)], env=env, check=True)
    program = time.perf_counter() - t0
    t0 = time.perf_counter()
    ct, lab = nib.load(str(image)), nib.load(str(labels))
    ct_array, lab_array = np.asanyarray(ct.dataobj), np.asanyarray(lab.dataobj)
    nib.Nifti1Image(ct_array, ct.affine, ct.header).to_filename(str(out / "floor_ct.nii.gz"))
    nib.Nifti1Image(lab_array, lab.affine, lab.header).to_filename(str(out / "floor_label.nii.gz"))
    return program, time.perf_counter() - t0


COUNT_RANGES = {"tiny": (3, 10), "small": (3, 10), "medium": (2, 5), "large": (1, 3)}  # the reference's draws


class _CountingRandom:
    """The reference's ``random`` module, with its tumor count forced (the same count for both engines)."""

    def __init__(self, size: str, count: int) -> None:
        import random

        self._random, self._range, self._count = random, COUNT_RANGES[size], count

    def randint(self, a: int, b: int) -> int:
        return self._count if (a, b) == self._range else self._random.randint(a, b)

    def __getattr__(self, name: str) -> object:
        return getattr(self._random, name)


def versus_reference(
    reference: Path, volumes: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], repeats: int
) -> None:
    """Per tumor, one thread, side by side with SyntheticTumors' own code (imported from a clone at
    ``reference``, never copied), with the same size class and tumor count per call; each call of both
    engines includes its organ preparation. The reference's texture start-up is timed apart."""
    sys.path.insert(0, str(reference))
    try:
        from TumorGenerated import utils as st  # the reference: needs cv2 and elasticdeform
    except ImportError as exc:
        print(f"\nreference not importable from {reference}: {exc}")
        return
    import random

    t0 = time.perf_counter()
    texture = st.get_predefined_texture((420, 300, 320), 3, 4)  # one of its ten start-up textures
    startup = time.perf_counter() - t0
    print(
        f"\nversus SyntheticTumors ({reference}): its start-up makes 10 textures of 420x300x320 float64 "
        f"({10 * texture.nbytes / 2**30:.1f} GB); one took {startup:.1f} s here (not counted below)"
    )
    print(f"  ms per tumor, median of {repeats} calls; count = tumors per call, the same for both")
    ratios = []
    for name, ct, labels, affine in volumes:
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        mask = labels == LIVER.value
        print(f"  {name}")
        for size, counts in (("tiny", (1, 5)), ("small", (1, 5)), ("medium", (1, 3)), ("large", (1, 2))):
            for count in counts:
                ours, theirs = [], []
                st.random = _CountingRandom(size, count)
                for seed in range(repeats):
                    random.seed(seed)
                    np.random.seed(seed)
                    volume, organ = ct.astype(np.float32), mask.astype(np.uint8)
                    t0 = time.perf_counter()
                    try:
                        st.SynthesisTumor(volume, organ, size, texture)
                    except Exception as exc:  # the reference fails on some inputs: say so
                        theirs.append(float("nan"))
                        print(f"    reference failed ({size}, seed {seed}): {type(exc).__name__}: {exc}")
                        continue
                    theirs.append((time.perf_counter() - t0) / count)
                    t0 = time.perf_counter()
                    synthesize_in_organ(ct, mask, LIVER, spacing=spacing, affine=affine,
                                        rng=np.random.default_rng(seed), size=size, count=count)  # fmt: skip
                    ours.append((time.perf_counter() - t0) / count)
                a, b = np.median(ours) * 1000, np.nanmedian(theirs) * 1000
                ratios.append(b / a)
                print(f"    {size:<7} count {count}: freetumor {a:7.1f}   SyntheticTumors {b:7.1f}   {b / a:5.1f}x")
        st.random = random
    print(f"  geometric mean speed-up {np.exp(np.mean(np.log(ratios))):.1f}x, lowest {min(ratios):.1f}x")


def realism(name: str, ct: Volume, labels: np.ndarray, seeds: int) -> None:
    """Mean HU of synthetic tumors minus the liver 2-10 mm around them (after insertion)."""
    organ_mask = labels == LIVER.value
    spacing = ct.spacing
    config = SynthesisConfig()
    geometry = prepare_organ(organ_mask, LIVER, spacing=spacing, affine=ct.affine, config=config)
    print(f"\n{name}: tumor minus surrounding liver (HU), {seeds} tumors per class")
    for size in SIZE_CLASSES:
        if not geometry.fits(config.size_class(size).radius_mm, config.min_depth_fraction):
            print(f"  {size:<7} does not fit")
            continue
        contrasts = []
        for seed in range(seeds):
            result = synthesize_in_organ(
                ct.array,
                organ_mask,
                LIVER,
                spacing=spacing,
                affine=ct.affine,
                rng=np.random.default_rng(seed),
                size=size,
                count=1,
                geometry=geometry,
            )
            tumor = result.tumor_mask
            liver = organ_mask[result.bbox] & ~tumor
            dist = ndimage.distance_transform_edt(~tumor, sampling=spacing)
            shell = liver & (dist >= 2) & (dist <= 10)
            if tumor.any() and shell.any():
                contrasts.append(result.image[tumor].mean() - result.image[shell].mean())
        c = np.array(contrasts)
        print(f"  {size:<7} mean {c.mean():+6.1f}  sd {c.std():5.1f}  range {c.min():+6.1f} .. {c.max():+6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 512x512x300 case")
    parser.add_argument(
        "--reference", type=Path, help="a clone of github.com/MrGiovanni/SyntheticTumors to time side by side"
    )
    parser.add_argument("--only-reference", action="store_true", help="only the side-by-side timing")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}"
    )

    crop = liver_crop_1mm()
    if args.reference is not None:
        volumes = [("128³ liver crop, 1 mm", crop.array[0], crop.array[1], crop.affine)]
        for shape, spacing in (((512, 512, 100), (0.78, 0.78, 2.5)), ((384, 384, 192), (0.9, 0.9, 1.25)),
                               ((512, 512, 300), (0.78, 0.78, 1.0))):  # fmt: skip
            phantom = make_phantom(shape, spacing, seed=1)
            volumes.append(("x".join(map(str, shape)), phantom.ct.array, phantom.labels.array, phantom.ct.affine))
        versus_reference(args.reference, volumes, 3 if args.quick else 5)
        del volumes
        if args.only_reference:
            return
    time_size_classes("128³ liver crop at 1 mm", crop.array[0], crop.array[1], crop.affine, repeats)

    sizes = [((512, 512, 100), (0.78, 0.78, 2.5))]
    if not args.quick:
        sizes.append(((512, 512, 300), (0.78, 0.78, 1.0)))
    with tempfile.TemporaryDirectory() as tmp:
        for shape, spacing in sizes:
            phantom = make_phantom(shape, spacing, seed=1)
            label = "x".join(map(str, shape))
            time_size_classes(f"{label} CT", phantom.ct.array, phantom.labels.array, phantom.ct.affine, repeats)
            time_memory_orders(phantom.ct.array, phantom.labels.array, phantom.ct.affine, repeats)
            image = save_volume(phantom.ct.array, phantom.ct, Path(tmp) / f"ct{label}.nii.gz")
            labels = save_volume(phantom.labels.array, phantom.ct, Path(tmp) / f"lab{label}.nii.gz", label=True)
            del phantom
            runs = [run_command(image, labels, Path(tmp) / "out") for _ in range(1 if args.quick else 3)]
            walls = sorted(w for w, _ in runs)
            peak = max(p for _, p in runs)
            (Path(tmp) / "floor").mkdir(exist_ok=True)
            floors = [load_save_floor(image, labels, Path(tmp) / "floor") for _ in range(len(runs))]
            program = sorted(f for f, _ in floors)[len(floors) // 2]
            inside = sorted(f for _, f in floors)[len(floors) // 2]
            print(
                f"  whole command (read, synthesize 1 medium tumor, write .nii.gz), {len(runs)} run(s): "
                f"median {walls[len(walls) // 2]:.2f} s (min {walls[0]:.2f}, max {walls[-1]:.2f}), peak {peak:.0f} MB"
            )
            command = walls[len(walls) // 2]
            print(
                f"  nibabel load + save of the same files (the floor): a program {program:.2f} s, in this process "
                f"{inside:.2f} s; command / floor {command / program:.2f} ({command / inside:.2f} against the in-process floor)"
            )

        phantom = make_phantom((192, 192, 120), (1.5, 1.5, 1.5), seed=2)
        realism("phantom at 1.5 mm", phantom.ct, phantom.labels.array, 5 if args.quick else 20)
    if (SHARED / "ct.nii.gz").is_file():
        realism(
            "real CT totalseg_abdomen (3 mm)",
            load_volume(SHARED / "ct.nii.gz"),
            load_volume(SHARED / "organs.nii.gz").array,
            5 if args.quick else 20,
        )
    print(f"\nbenchmark peak memory (this process): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
