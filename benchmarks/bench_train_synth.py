"""Speed of ``freetumor train-synth`` on this machine's CPU.

For a tiny setup (UNet3D with 8 base channels, 32³ crops, tiny UNet critic) and the reference one
(UNet3D with 32 base channels, about 19 M parameters, 96³ crops, UNet 16..256 critic):
- one adversarial step (generator update against discriminator and critic, then discriminator update);
- crops per second;
- the rule-based tumor geometry and texture per crop (loader work) and its share of a step.

Run: python benchmarks/bench_train_synth.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

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
from freetumor_cli.core.phantom import make_phantom
from freetumor_cli.core.training import fused_update
from freetumor_cli.core.transforms import RandTumorGeometryd


def geometry_time(roi: int, repeats: int) -> float:
    """Median seconds of the rule-based geometry + texture for one crop centred on the liver."""
    p = make_phantom((160, 150, 110), (1.5, 1.5, 1.5), seed=0)
    labels = p.labels.array
    center = np.argwhere(labels == 1).mean(axis=0).astype(int)
    lo = np.clip(center - roi // 2, 0, np.array(labels.shape) - roi)
    box = tuple(slice(int(a), int(a) + roi) for a in lo)
    image = np.clip((p.ct.array[box].astype(np.float32) + 175) / 425, 0, 1)
    transform = RandTumorGeometryd(["image", "label"], "all", spacing_mm=(1.5, 1.5, 1.5), window_hu=(-175.0, 250.0))
    times = []
    for k in range(repeats):
        transform.set_random_state(k)
        data = {"image": torch.as_tensor(image[None]), "label": torch.as_tensor(labels[box][None].astype(np.float32))}
        t0 = time.perf_counter()
        transform(data)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def step_time(base: int, roi: int, crops: int, critic_name: str, repeats: int) -> float:
    torch.manual_seed(0)
    gan = GanConfig(base_channels=base)
    generator, discriminator = make_generator(gan), make_discriminator(gan)
    critic = freeze_critic(build_model(ModelConfig(name=critic_name, out_channels=7, roi=(roi,) * 3)))  # type: ignore[arg-type]
    fused = fused_update(torch.device("cpu"))  # as train-synth
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.999), fused=fused)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.0, 0.999), fused=fused)
    shape = (crops, 1, roi, roi, roi)
    synth = torch.zeros(shape, dtype=torch.bool)
    synth[:, :, roi // 3 : roi // 2, roi // 3 : roi // 2, roi // 3 : roi // 2] = True
    labels = torch.ones(shape)
    labels[synth] = 2
    batch = GanBatch(
        torch.rand(shape), labels, synth, synth.float() * 0.5, [0] * crops, [2, 4, 6], [2] * crops, labels > 0
    )
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        _, fake = generator_step(generator, discriminator, critic, opt_g, batch, gan)
        discriminator_step(discriminator, opt_d, fake, batch)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one reference step only")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    )
    for label, base, roi, crops, critic, repeats in (
        ("tiny: UNet3D base 8, 32³, 4 crops, unet-tiny critic", 8, 32, 4, "unet-tiny", 3),
        ("reference: UNet3D base 32 (19 M), 96³, 1 crop, unet critic", 32, 96, 1, "unet", 1 if args.quick else 2),
    ):
        step = step_time(base, roi, crops, critic, repeats)
        geometry = geometry_time(roi, 6)
        print(
            f"{label}: step {step:.2f} s = {crops / step:.2f} crops/s; rule-based geometry + texture "
            f"{geometry * 1000:.0f} ms per crop = {crops * geometry / step:.0%} of a step (done in loader workers)"
        )


if __name__ == "__main__":
    main()
