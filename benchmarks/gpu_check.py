"""The GPU checks of the training path, in one run (about 5 minutes on one modern GPU).

Prints, for the machine it runs on:
1. SwinUNETR v2 (feature 48), 4 crops of 96³, bf16: optimizer steps/s and peak GPU memory;
2. the loader from the case store with online synthesis (train-seg freesyn's, 4 crops of 96³ per
   volume) with 4, 8 and 16 workers: crops/s, and the share of a SwinUNETR step's time the GPU waits for
   data when the loader feeds it;
3. one train-synth step (generator and discriminator at 32 base channels, the 7-class SwinUNETR critic),
   4 crops of 96³, bf16: seconds and peak GPU memory;
4. ``evaluate --checkpoint`` of a SwinUNETR on a 512×512×300 CT: seconds and peak GPU memory.

The CTs are phantoms written as int16 ``.nii.gz`` (512×512×300 at 0.78 × 0.78 × 1 mm). Weights are
random: the figures are speed and memory, not accuracy.

Run: python benchmarks/gpu_check.py            (needs CUDA)
     python benchmarks/gpu_check.py --smoke    (every stage at toy sizes on the CPU: checks the script)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_loader import write_data_root  # this folder is on the path of a script run from it


def peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def segmentation_step(
    model_name: str, roi: tuple[int, int, int], out_channels: int, device: str
) -> tuple[torch.nn.Module, object, object]:
    from monai.losses import DiceCELoss

    from freetumor_cli.core.models import ModelConfig, build_model
    from freetumor_cli.core.training import fused_update

    model = build_model(ModelConfig(name=model_name, out_channels=out_channels, roi=roi)).to(device)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-4, weight_decay=0.01, amsgrad=True, fused=fused_update(torch.device(device))
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, optimizer


def check_swinunetr(device: str, roi: tuple[int, int, int], model_name: str, steps: int) -> float:
    _, step, _ = segmentation_step(model_name, roi, 3, device)
    x = torch.rand(4, 1, *roi, device=device)
    y = torch.randint(0, 3, (4, 1, *roi), device=device).float()
    for _ in range(3):
        step(x, y)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    print(
        f"1. {model_name} 4 × {roi[0]}³ bf16: {1 / seconds:.2f} steps/s ({4 / seconds:.1f} crops/s), peak {peak_gb(device):.1f} GB"
    )
    return seconds


def check_loader(
    prepared: Path, device: str, roi: tuple[int, int, int], model_name: str, workers: list[int], steps: int
) -> None:
    from freetumor_cli.core.prepare import read_manifest
    from freetumor_cli.core.preprocess import Preprocessing
    from freetumor_cli.core.seg_data import CropDataset, Pipeline, crop_transforms
    from freetumor_cli.core.store import CaseSource, open_store
    from freetumor_cli.core.training import make_loader

    preprocessing = Preprocessing.for_region("abdomen")
    store = open_store(prepared, preprocessing)
    assert store is not None, "no case store"
    entries = read_manifest(prepared) * 200
    pipeline = Pipeline(task="liver", preprocessing=preprocessing, roi=roi, synthesize=True)
    dataset = CropDataset(entries, CaseSource(preprocessing, store), pipeline, crop_transforms(pipeline), seed=0)
    _, step, _ = segmentation_step(model_name, roi, 3, device)
    for count in workers:
        loader = iter(make_loader(dataset, batch_size=1, workers=count, seed=0))
        for _ in range(max(2, count // 2)):  # warm the workers up
            next(loader)
        waited = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            w0 = time.perf_counter()
            batch = next(loader)
            images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            waited += time.perf_counter() - w0
            step(images, labels)
        sync(device)
        total = time.perf_counter() - t0
        print(
            f"2. loader from the store, {count:2d} workers, feeding {model_name}: {4 * steps / total:.1f} crops/s; "
            f"the GPU waited for data {waited / total:.0%} of the time"
        )
        del loader


def check_train_synth(device: str, roi: tuple[int, int, int], base: int, critic_name: str) -> None:
    from freetumor_cli.core.gan import (
        GanBatch,
        GanConfig,
        discriminator_step,
        freeze_critic,
        generator_step,
        make_discriminator,
        make_generator,
    )
    from freetumor_cli.core.models import ModelConfig, build_model
    from freetumor_cli.core.training import fused_update

    gan = GanConfig(base_channels=base)
    generator, discriminator = make_generator(gan).to(device), make_discriminator(gan).to(device)
    critic = freeze_critic(build_model(ModelConfig(name=critic_name, out_channels=7, roi=roi)).to(device))  # type: ignore[arg-type]
    fused = fused_update(torch.device(device))  # as train-synth
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.999), fused=fused)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.0, 0.999), fused=fused)
    shape = (4, 1, *roi)
    synth = torch.zeros(shape, dtype=torch.bool, device=device)
    synth[:, :, 30:60, 30:60, 30:60] = True
    batch = GanBatch(
        image=torch.rand(shape, device=device), labels=synth.float() * 2, synth_mask=synth,
        profile=synth.float() * 0.5, organ_channels=[0, 1, 2, 0], tumor_values=[2, 4, 6], seg_tumor_channels=[2, 4, 6, 2],
        organ_mask=synth,
    )  # fmt: skip

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            _, fake = generator_step(generator, discriminator, critic, opt_g, batch, gan)
            discriminator_step(discriminator, opt_d, fake, batch)

    step()
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    sync(device)
    print(f"3. train-synth step (G + D at {base} base channels, {critic_name} critic), 4 × {roi[0]}³ bf16: "
          f"{(time.perf_counter() - t0) / 5:.2f} s, peak {peak_gb(device):.1f} GB")  # fmt: skip


def check_evaluate(ct: Path, tmp: Path, device: str, model_name: str, roi: tuple[int, int, int]) -> None:
    from freetumor_cli.core.checkpoints import save_checkpoint
    from freetumor_cli.core.models import ModelConfig, build_model
    from freetumor_cli.core.predict import predict_cases

    config = ModelConfig(name=model_name, out_channels=3, roi=roi)  # type: ignore[arg-type]
    save_checkpoint(build_model(config), config, tmp / "checkpoint")
    reset_peak(device)
    t0 = time.perf_counter()
    predict_cases(tmp / "checkpoint", [ct], tmp / "predictions", device=device)
    sync(device)
    print(
        f"4. evaluate --checkpoint ({model_name}, overlap 0.75) on {ct.name}: {time.perf_counter() - t0:.1f} s, peak {peak_gb(device):.1f} GB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: runs every stage quickly")
    args = parser.parse_args()
    from freetumor_cli.core.prepare import PrepareConfig, prepare

    if args.smoke:
        device, roi, model, shape, spacing, workers, steps, base = (
            "cpu",
            (32, 32, 32),
            "unet-tiny",
            (128, 128, 60),
            (3.0, 3.0, 5.0),
            [1, 2],
            3,
            4,
        )
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check needs a CUDA device (use --smoke to run it at toy sizes on the CPU)")
        device, roi, model, shape, spacing, workers, steps, base = (
            "cuda",
            (96, 96, 96),
            "swinunetr",
            (512, 512, 300),
            (0.78, 0.78, 1.0),
            [4, 8, 16],
            40,
            32,
        )
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {name}; {os.cpu_count()} CPUs; torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        started = time.perf_counter()
        check_swinunetr(device, roi, model, 5 if args.smoke else 20)
        root, prepared = tmp / "data", tmp / "prepared"
        write_data_root(root, 1, ((shape, spacing),) * 3)
        result = prepare(root, prepared, PrepareConfig(folds=2), workers=3)
        assert result.store is not None
        print(
            f"   (case store of 3 CTs of {shape[0]}×{shape[1]}×{shape[2]}: {result.store.seconds:.0f} s, {result.store.bytes / 2**20 / 3:.0f} MB per case)"
        )
        check_loader(prepared, device, roi, model, workers, steps)
        check_train_synth(device, roi, base, model)
        check_evaluate(root / "Dataset003_Liver" / "imagesTr" / "liver_0_0000.nii.gz", tmp, device, model, roi)
        print(f"all checks in {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
