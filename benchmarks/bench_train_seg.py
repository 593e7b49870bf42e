"""Speed of ``freetumor train-seg`` on this machine's CPU.

For the tiny UNet at 32³ and the reference UNet (16..256 channels) at 96³, on phantom CTs at 1.5 mm:
- loading one volume into 4 augmented crops (the data loader's work, per volume);
- online synthesis of one rule-based tumor per crop (loader work, per crop);
- one optimizer step on 4 crops, and the quality-control forward pass of a frozen baseline;
- crops per second of a step, and the share of the step's time that synthesis would take if it ran
  in the training process (it runs in the loader's workers, in parallel with the step).

Run: python benchmarks/bench_train_seg.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from freetumor_cli.core.io import save_volume
from freetumor_cli.core.models import ModelConfig, build_model
from freetumor_cli.core.phantom import make_phantom
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.seg_data import CropDataset, Pipeline, crop_transforms
from freetumor_cli.core.store import CaseSource
from freetumor_cli.core.training import fused_update
from freetumor_cli.core.transforms import RandTumorSynthd


def median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_model(name: str, roi: tuple[int, int, int], entries: list[dict[str, str]], repeats: int) -> None:
    pipe = Pipeline(task="liver", preprocessing=Preprocessing.for_region("abdomen"), roi=roi)
    dataset = CropDataset(entries, CaseSource(pipe.preprocessing, None), pipe, crop_transforms(pipe), seed=0)
    load = median_time(lambda: dataset[0], repeats)
    crops = dataset[1]
    synth = RandTumorSynthd(("image", "label"), "liver", spacing_mm=(1.5, 1.5, 1.5), window_hu=(-175.0, 250.0))
    organ_crops = [c for c in crops if bool((c["label"] == 1).any()) and not bool((c["label"] == 2).any())] or crops
    synth_times, inserted = [], 0
    for k in range(repeats * 2):
        synth.set_random_state(k)
        crop = {
            key: value.clone() for key, value in organ_crops[k % len(organ_crops)].items() if key in ("image", "label")
        }
        t0 = time.perf_counter()
        result = synth(crop)
        synth_times.append(time.perf_counter() - t0)
        inserted += bool(result["synth_mask"].any())
    per_crop_synth = float(np.median(synth_times))
    config = ModelConfig(name=name, out_channels=3, roi=roi)  # type: ignore[arg-type]
    model, baseline = build_model(config), build_model(config).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, amsgrad=True, fused=fused_update(torch.device("cpu")))
    x = torch.rand(4, 1, *roi)
    y = torch.randint(0, 3, (4, 1, *roi)).float()
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def step() -> None:
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def qc() -> None:
        with torch.no_grad():
            torch.softmax(baseline(x), 1)

    step()
    t_step = median_time(step, repeats)
    t_qc = median_time(qc, repeats)
    synth_batch = 4 * per_crop_synth
    print(f"\n{name} at {roi[0]}³ (4 crops per step):")
    print(f"  loader, raw files: {load:.2f} s per volume (load, resample, window, crop into 4, augment)")
    print(
        f"  online synthesis: {per_crop_synth * 1000:.0f} ms per crop ({inserted}/{len(synth_times)} crops got a tumor)"
    )
    print(
        f"  step (forward + backward + AdamW): {t_step:.3f} s = {4 / t_step:.1f} crops/s; with QC forward {t_step + t_qc:.3f} s = {4 / (t_step + t_qc):.1f} crops/s"
    )
    print(
        f"  synthesis of a batch = {synth_batch / (t_step + t_qc):.0%} of a step with QC "
        f"({synth_batch / (synth_batch + load):.0%} of the loader's work per batch; in loader workers it overlaps the step)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    repeats = 2 if args.quick else 4
    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        for i in range(2):
            p = make_phantom((200, 170, 120), (1.5, 1.5, 1.5), seed=i)
            image = save_volume(p.ct.array, p.ct, Path(tmp) / f"ct{i}.nii.gz")
            label = save_volume(p.labels.array, p.ct, Path(tmp) / f"lab{i}.nii.gz", label=True)
            entries.append({"image": str(image), "label": str(label)})
        for name, roi in (("unet-tiny", (32, 32, 32)), ("unet", (96, 96, 96))):
            bench_model(name, roi, entries, repeats)


if __name__ == "__main__":
    main()
