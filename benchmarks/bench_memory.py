"""Peak memory of one training step, measured against the estimate that train-seg and train-synth check.

Each case runs two optimizer steps in a fresh process (a forward and backward pass, AdamW or the GAN's
two Adam steps) and reports the process's peak resident memory next to
:func:`freetumor_cli.core.memory.estimate`. The coefficients in ``core/memory.py`` come from these runs.

    python benchmarks/bench_memory.py            # every case (SwinUNETR ones take minutes on a CPU)
    python benchmarks/bench_memory.py --quick    # the UNets only
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

GiB = 2**30

CASES = [  # kind, network, crop side, crops per step
    ("seg", "unet-tiny", 96, 4),
    ("seg", "unet", 64, 2),
    ("seg", "unet", 96, 2),
    ("seg", "unet", 96, 4),
    ("seg", "unet", 128, 1),
    ("seg", "swinunetr", 64, 1),
    ("seg", "swinunetr", 64, 2),
    ("gan", "unet-tiny", 64, 1),
    ("gan", "swinunetr", 64, 1),
]
QUICK = {("seg", "unet-tiny"), ("seg", "unet")}

CHILD = r"""
import json, resource, sys
import torch
from freetumor_cli.core.models import ModelConfig, build_model
from freetumor_cli.core import memory

kind, name, side, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
roi = (side, side, side)
net = build_model(ModelConfig(name=name, out_channels=3, roi=roi))
if kind == "seg":
    from monai.losses import DiceCELoss

    opt = torch.optim.AdamW(net.parameters())
    x, y = torch.rand(batch, 1, *roi), torch.randint(0, 3, (batch, 1, *roi))
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(2):
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
    need = memory.estimate(device="cpu", crops_per_step=batch, activation_per_crop=memory.activation_bytes(name, roi),
                           trained_parameters=memory.parameter_count(net))
else:
    from freetumor_cli.core.gan import GanBatch, GanConfig, discriminator_step, freeze_critic, generator_step
    from freetumor_cli.core.gan import make_discriminator, make_generator

    gan = GanConfig(region="abdomen", base_channels=32, adversarial_weight=0.1)
    g, d, critic = make_generator(gan), make_discriminator(gan), freeze_critic(net)
    og, od = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
    image, mask = torch.rand(batch, 1, *roi), torch.rand(batch, 1, *roi) > 0.9
    b = GanBatch(image, torch.randint(0, 3, (batch, 1, *roi)), mask, mask.float() * 0.5, [0] * batch, [2], [2] * batch,
                 torch.ones_like(mask))
    for _ in range(2):
        _, fake = generator_step(g, d, critic, og, b, gan)
        discriminator_step(d, od, fake, b)
    per_crop = memory.GAN_BYTES_PER_VOXEL_AT_BASE_32 * memory.voxels(roi)
    per_crop += memory.CRITIC_FRACTION * memory.activation_bytes(name, roi)
    need = memory.estimate(device="cpu", crops_per_step=batch, activation_per_crop=per_crop,
                           trained_parameters=memory.parameter_count(g) + memory.parameter_count(d),
                           frozen_parameters=memory.parameter_count(critic))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak, "estimate": need.device_bytes}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the UNet cases")
    args = parser.parse_args()
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU")
    print(f"{'step':<28}{'measured peak':>15}{'estimate':>12}{'estimate/measured':>20}")
    for kind, name, side, batch in CASES:
        if args.quick and (kind, name) not in QUICK:
            continue
        done = subprocess.run(
            [sys.executable, "-c", CHILD, kind, name, str(side), str(batch)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(f"{kind} {name} {side}³ ×{batch}: failed\n{done.stderr[-2000:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        label = f"{kind} {name} {side}³ ×{batch}"
        ratio = row["estimate"] / row["peak"]
        print(f"{label:<28}{row['peak'] / GiB:>12.2f} GiB{row['estimate'] / GiB:>8.2f} GiB{ratio:>20.2f}")


if __name__ == "__main__":
    main()
