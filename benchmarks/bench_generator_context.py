"""Generators on the context they were trained on: quality-control pass rate and HU contrast, before and after.

On one phantom world (``freetumor_cli.core.fair``: 3 mm, 32³ crops, the liver), the same held-out crops
of organ-only cases (train-seg's sampling: 4 crops per case, positives and negatives 1:1, one rule-based
tumor geometry in each crop with organ) are given the intensity of a generator in several ways, and the
same critic (the paired experiment's baseline, trained here or passed with ``--critic``) scores them.

1. ``TGAN.pt``-shaped generators (the Models-Genesis UNet3D, 32 base channels, 3 outputs, channel 0 for
   every organ, its batch norm on the statistics of what it is given), random weights, ``--generators``
   seeds:

   - train-seg before: one forward over each batch of 4 crops, normalised on the batch's statistics
     (negatives without organ included), the map blurred without keeping it to the organ;
   - synthesize before: the tumor's box padded to a multiple of 8 (at least 16), on its own statistics;
   - after: each crop on its own statistics, the map kept to the organ then blurred (train-seg, and
     synthesize, which runs the generator on a crop of its own size centred on the tumor);
   - after, map not kept to the organ (item 6 alone).

2. freetumor's own generator trained here (``--synth-steps``) with ``BatchNorm3d``: as the adversarial
   step sees it (statistics of its batch of 4 organ crops), as it was used (eval mode: running
   statistics), and on each crop's own statistics; and one trained with per-crop statistics, whose
   training and use are one computation.

Run: python benchmarks/bench_generator_context.py [--out bench_generator_context] [--critic CHECKPOINT]

The defaults ran in 83 minutes on a 2-core CPU shared with other work (most of it the 1000-step critic);
a rerun with the same ``--out`` reuses the world, the critic and the generators.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freetumor_cli.core.checkpoints import load_checkpoint
from freetumor_cli.core.fair import FairConfig, baseline_config, crop_rules, prepared_world, train_run
from freetumor_cli.core.gan import GanConfig, compose, intensity_map, make_generator, organ_voxels
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.registry import REGIONS, TASKS
from freetumor_cli.core.seg_data import CropDataset, Pipeline, crop_transforms, read_task_datalist
from freetumor_cli.core.training import case_source, collate_crops

TASK = "liver"
SIGN = float(REGIONS["abdomen"].tumor_sign)


def heldout_batches(prepared: Path, config: FairConfig, cases: int, *, pos: float, neg: float) -> list[dict[str, Any]]:
    """Batches of 4 crops (one case each) of the organ-only cases of fold 0's validation list (the generators
    never train on them)."""
    lists = read_task_datalist(prepared, TASK, 0)
    entries = [e for e in lists["validation"] if e.get("role") != "tumor-labelled"][:cases]
    preprocessing = Preprocessing.for_region("abdomen", spacing_mm=config.spacing_mm)
    pipeline = Pipeline(
        task=TASK, preprocessing=preprocessing, roi=(config.roi,) * 3, crops_per_volume=4, pos=pos, neg=neg,
        augment=False, geometry_only=True,
    )  # fmt: skip
    dataset = CropDataset(
        entries, case_source(prepared, preprocessing), pipeline, crop_transforms(pipeline, crop_rules(config)), 7
    )
    return [collate_crops([dataset[i]]) for i in range(len(dataset))]


def organ_mask(batch: dict[str, Any]) -> torch.Tensor:
    value = next(v for v, o in TASKS[TASK].organ_values.items() if o == "liver")
    return organ_voxels(batch["label"], batch["synth_mask"].bool(), [value] * batch["label"].shape[0])


def compose_with(batch: dict[str, Any], change: torch.Tensor) -> torch.Tensor:
    return compose(batch["image"], batch["profile"], change, SIGN)


def per_crop(generator: Any, batch: dict[str, Any], *, in_organ: bool = True) -> torch.Tensor:
    """After: each crop on its own (the generator's norm normalises each crop with its own statistics)."""
    mask = organ_mask(batch) if in_organ else torch.ones_like(batch["synth_mask"], dtype=torch.bool)
    with torch.no_grad():
        return intensity_map(generator(batch["image"]), [0] * len(mask), "abdomen", mask)


def over_the_batch(generator: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Before, train-seg: one forward over the batch, normalised on the batch's statistics, blur unmasked."""
    twin = make_generator(replace(GanConfig(), base_channels=generator.out_tr.in_channels // 2, batch_stats=False))
    twin.load_state_dict(generator.state_dict())
    twin.train()  # BatchNorm3d in training mode: the batch's statistics, as the released norm on a batch
    with torch.no_grad():
        return intensity_map(
            twin(batch["image"]), [0] * batch["image"].shape[0], "abdomen", torch.ones_like(batch["image"])
        )


def on_the_tumor_box(generator: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Before, synthesize: the tumor's box padded to a multiple of 8 by repeating its edge, its own statistics
    (at least 16 a side here: an 8³ box leaves one value per channel at the bottleneck, which the
    released norm cannot normalise)."""
    change = torch.zeros_like(batch["image"])
    for b in range(batch["image"].shape[0]):
        where = torch.nonzero(batch["profile"][b, 0] > 0)
        if not len(where):
            continue
        low, high = where.min(0).values.tolist(), (where.max(0).values + 1).tolist()
        box = tuple(slice(a, c) for a, c in zip(low, high, strict=True))
        x = batch["image"][b : b + 1, :, box[0], box[1], box[2]]
        shape = x.shape[2:]
        pads = [max(16, -(-n // 8) * 8) - n for n in shape]
        padded = torch.nn.functional.pad(x, [p for n in reversed(pads) for p in (0, n)], mode="replicate")
        with torch.no_grad():
            out = intensity_map(generator(padded), [0], "abdomen", torch.ones_like(padded))
        change[b, :, box[0], box[1], box[2]] = out[:, :, : shape[0], : shape[1], : shape[2]]
    return change


def scores(
    critic: Any, channel: int, batches: list[dict[str, Any]], images: list[torch.Tensor], width: float
) -> tuple[float, float, int]:
    """QC pass rate (share of synthetic tumors the critic calls tumor on more than 70 % of their voxels),
    mean HU contrast inside them, and how many tumors."""
    passed, contrasts = [], []
    for batch, image in zip(batches, images, strict=True):
        with torch.no_grad():
            predicted = torch.softmax(critic(image).float(), 1).argmax(1)
        for b in range(image.shape[0]):
            mask = batch["synth_mask"][b, 0].bool()
            if not bool(mask.any()):
                continue
            passed.append(float((predicted[b][mask] == channel).float().mean()) > 0.7)
            contrasts.append(float((image[b, 0][mask] - batch["image"][b, 0][mask]).mean()) * width)
    return float(np.mean(passed)), float(np.mean(contrasts)), len(passed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_generator_context"))
    parser.add_argument("--critic", type=Path, help="a liver baseline at 3 mm, 32³ (default: trained here)")
    parser.add_argument("--baseline-steps", type=int, default=1000, help="the critic's steps when trained here")
    parser.add_argument("--synth-steps", type=int, default=60)
    parser.add_argument("--generators", type=int, default=3, help="random TGAN.pt-shaped generators")
    parser.add_argument("--cases", type=int, default=12, help="held-out organ-only cases, 4 crops each")
    args = parser.parse_args()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    started = time.perf_counter()
    config = replace(FairConfig(), seeds=(0,))
    _, prepared = prepared_world(args.out / "world", config, 0, step=print)
    critic_path = args.critic
    if critic_path is None:
        print(f"critic: {args.baseline_steps} steps of the paired experiment's baseline")
        critic_run = args.out / f"critic_{args.baseline_steps}"
        train_run(prepared, critic_run, baseline_config(replace(config, baseline_steps=args.baseline_steps), 0), None)
        critic_path = critic_run / "checkpoints" / "last"
    critic, critic_config, _ = load_checkpoint(critic_path)
    critic.eval()
    channel = critic_config.tumor_channel("liver")
    width = float(np.diff(critic_config.preprocessing.window_hu)[0])
    seg_batches = heldout_batches(prepared, config, args.cases, pos=1.0, neg=1.0)
    organ_batches = heldout_batches(prepared, config, args.cases, pos=1.0, neg=0.0)
    rules = [compose_with(b, torch.full_like(b["image"], 105.0 / width)) for b in seg_batches]
    rows: list[tuple[str, str, tuple[float, float, int]]] = []
    rows.append(
        ("-", "rule-based engine (105 HU, the calibrated mean)", scores(critic, channel, seg_batches, rules, width))
    )

    ways = {
        "train-seg before: batch of 4, batch statistics, blur unmasked": over_the_batch,
        "synthesize before: tumor box padded to x8, its statistics": on_the_tumor_box,
        "after: each crop its own statistics, kept to the organ": per_crop,
        "after, map not kept to the organ (item 6 alone)": lambda g, b: per_crop(g, b, in_organ=False),
    }
    for seed in range(args.generators):
        torch.manual_seed(seed)
        tgan = make_generator(GanConfig(base_channels=32, batch_stats=True)).eval()
        for name, way in ways.items():
            images = [compose_with(b, way(tgan, b)) for b in seg_batches]
            rows.append((f"TGAN-shaped #{seed}", name, scores(critic, channel, seg_batches, images, width)))

    from freetumor_cli.core.checkpoints import load_generator, save_generator, trained_channels
    from freetumor_cli.core.train_synth import TrainSynthConfig, train_generator

    for crop_stats in (False, True):
        run = args.out / ("generator_crop_stats" if crop_stats else "generator_batchnorm")
        if not (run / "checkpoints" / "last" / "generator.json").is_file():
            gan = GanConfig(base_channels=config.generator_channels, batch_stats=crop_stats)
            torch.manual_seed(0)
            save_generator(
                make_generator(gan), gan, run.parent / f"{run.name}_init", preprocessing=critic_config.preprocessing, roi=(config.roi,) * 3, organ_channels=trained_channels(TASK),
            )  # fmt: skip
            synth = TrainSynthConfig(
                max_steps=args.synth_steps, roi=(config.roi,) * 3, labelled_repeats=1, heldout_crops=8, lr=1e-3,
                workers=0, spacing_mm=config.spacing_mm, rules=crop_rules(config), init=str(run.parent / f"{run.name}_init"),
            )  # fmt: skip
            print(f"generator ({'per-crop statistics' if crop_stats else 'BatchNorm3d'}): {args.synth_steps} steps")
            train_generator(prepared, run, synth, baseline=critic_path)
        generator = load_generator(run / "checkpoints" / "last").module
        label = "trained, per-crop statistics" if crop_stats else "trained, BatchNorm3d"
        if not crop_stats:
            in_training = make_generator(GanConfig(base_channels=config.generator_channels))
            in_training.load_state_dict(generator.state_dict())
            in_training.train()  # as the adversarial step sees it: its batch of 4 organ crops
            with torch.no_grad():
                images = [
                    compose_with(b, intensity_map(in_training(b["image"]), [0] * 4, "abdomen", organ_mask(b)))
                    for b in organ_batches
                ]
            rows.append(
                (
                    label,
                    "as in training: statistics of its batch of 4",
                    scores(critic, channel, organ_batches, images, width),
                )
            )
            generator.eval()
            images = [compose_with(b, per_crop(generator, b)) for b in organ_batches]
            rows.append(
                (label, "in use before: running statistics", scores(critic, channel, organ_batches, images, width))
            )
            crop_twin = make_generator(GanConfig(base_channels=config.generator_channels, batch_stats=True))
            crop_twin.load_state_dict(generator.state_dict())
            images = [compose_with(b, per_crop(crop_twin, b)) for b in organ_batches]
            rows.append((label, "each crop its own statistics", scores(critic, channel, organ_batches, images, width)))
        else:
            images = [compose_with(b, per_crop(generator, b)) for b in organ_batches]
            rows.append(
                (
                    label,
                    "training = use: each crop its own statistics",
                    scores(critic, channel, organ_batches, images, width),
                )
            )

    print()
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, CPU; critic {critic_path}")
    print(f"{'generator':<32} {'how':<64} {'QC pass':>8} {'HU contrast':>12} {'tumors':>7}")
    for who, how, (qc, hu, n) in rows:
        print(f"{who:<32} {how:<64} {qc:>8.2f} {hu:>12.1f} {n:>7d}")
    print(f"\n{(time.perf_counter() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
