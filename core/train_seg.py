"""Segmentation training (``train-seg``): one Accelerate loop for the baseline and for online synthesis.

A run trains a network for a registry task (``liver``, ``pancreas``, ``kidney``, ``covid``, ``all``) in
one of two modes. ``onlylabeled`` trains on the tumor-labelled cases (the baseline segmentor). ``freesyn`` adds organ-only
cases and inserts a rule-based tumor into every crop with an organ and no real tumor; with a baseline,
quality control keeps a synthetic tumor only when the frozen baseline finds more than ``qc_threshold``
of it, else the original crop is used. Then CutMix along one axis.

The run folder explains itself: ``config.yaml``, ``labels.json``, ``metrics.jsonl``, TensorBoard logs
(``logs/``), ``checkpoints/best`` and ``checkpoints/last`` (safetensors + model.json), ``state/``
(Accelerate state for ``--resume``) and ``curves.png``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from freetumor_cli import __version__
from freetumor_cli.core.config import to_yaml
from freetumor_cli.core.errors import ConfigError, InputError
from freetumor_cli.core.gan import compose, intensity_map
from freetumor_cli.core.io import write_text_atomic
from freetumor_cli.core.models import ModelConfig, ModelName, build_model, load_checkpoint, save_checkpoint
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.registry import ORGANS, REGIONS, TASKS, TaskName, check_choices
from freetumor_cli.core.seg_data import (
    Pipeline,
    SeededDataset,
    cutmix_along_axis,
    load_transforms,
    quality_control,
    read_task_datalist,
    sample_seed,
    train_transforms,
)
from freetumor_cli.core.synthesis_config import SynthesisConfig
from freetumor_cli.core.training import collate_crops, has_tensorboard, log_metrics, save_training_state, seed_worker


@dataclass(frozen=True)
class TrainSegConfig:
    """A segmentation run (defaults are the method's, DESIGN §7).

    ``task`` is what the network predicts (a registry task); ``mode`` how it is trained: ``onlylabeled``
    (real tumors only; the baseline) or ``freesyn`` (real plus online synthetic tumors). Left unset,
    ``epochs`` and ``labelled_repeats`` default by mode (100 and ×1 for ``onlylabeled``, 20 and ×10 for
    ``freesyn``), ``roi`` and ``spacing_mm`` by the task's region (96³ at 1.5 mm for the abdomen,
    192 × 192 × 32 at 1.25 × 1.25 × 5 mm for the chest): :meth:`resolved` fills them in.
    """

    task: TaskName = "liver"
    mode: Literal["onlylabeled", "freesyn"] = "onlylabeled"
    fold: int = 0
    model: ModelName = "swinunetr"
    epochs: int | None = None
    max_steps: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 2.0
    roi: tuple[int, int, int] | None = None
    crops_per_volume: int = 4
    volumes_per_batch: int = 1
    pos: float = 1.0
    neg: float = 1.0
    labelled_repeats: int | None = None
    synth: str = "rules"
    qc_threshold: float = 0.7
    cutmix: bool = True
    cutmix_alpha: float = 0.2
    val_every: int = 1
    overlap: float = 0.75
    save_every_steps: int = 100
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_accum: int = 1
    workers: int = 2
    seed: int = 0
    augment: bool = True
    spacing_mm: tuple[float, float, float] | None = None
    rules: SynthesisConfig = field(default_factory=SynthesisConfig)

    def resolved(self) -> TrainSegConfig:
        """This configuration with every default that depends on the mode or the region filled in.

        Raises:
            ConfigError: a combination that cannot work (SwinUNETR on a crop under 64 voxels per axis).
        """
        region = REGIONS[TASKS[self.task].region]
        config = replace(
            self,
            epochs=self.epochs if self.epochs is not None else (100 if self.mode == "onlylabeled" else 20),
            labelled_repeats=self.labelled_repeats
            if self.labelled_repeats is not None
            else (1 if self.mode == "onlylabeled" else 10),
            roi=self.roi or region.roi,
            spacing_mm=self.spacing_mm or region.spacing_mm,
        )
        assert config.roi is not None
        if config.model == "swinunetr" and min(config.roi) < 64:
            raise ConfigError(
                f"SwinUNETR needs a crop of at least 64 voxels per axis, got {list(config.roi)}",
                hint="use --model unet, or --set roi=[192,192,64] for the chest",
            )
        return config

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0 <= self.qc_threshold <= 1:
            raise ValueError("qc_threshold must lie in [0, 1]")
        if self.grad_accum < 1 or self.crops_per_volume < 1 or self.volumes_per_batch < 1:
            raise ValueError("grad_accum, crops_per_volume and volumes_per_batch must be >= 1")
        if self.synth != "rules" and not (Path(self.synth) / "generator.json").is_file():
            raise ValueError(
                f"synth must be 'rules' or a generator checkpoint folder of train-synth, got {self.synth!r}"
            )


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine to 0, per iteration."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def model_config_for(config: TrainSegConfig) -> ModelConfig:
    """The network's configuration: its task's label space and the run's preprocessing."""
    config = config.resolved()
    task = TASKS[config.task]
    preprocessing = Preprocessing.for_region(task.region, spacing_mm=config.spacing_mm)
    assert config.roi is not None
    return ModelConfig(
        name=config.model,
        out_channels=task.out_channels,
        roi=config.roi,
        region=task.region,
        task=task.name,
        spacing_mm=preprocessing.spacing_mm,
        window_hu=preprocessing.window_hu,
        labels={str(k): v for k, v in task.labels.items()},
    )


def _validation_dice(
    model: Any, entries: list[dict[str, Any]], pipeline: Pipeline, config: TrainSegConfig, accelerator: Any
) -> float:
    """Mean tumor Dice over validation cases (sliding window, overlap, Gaussian blending), all processes."""
    import torch
    from monai import transforms as T
    from monai.inferers import sliding_window_inference

    from freetumor_cli.core.metrics import dice

    load = T.Compose(load_transforms(pipeline))
    tumors = list(TASKS[config.task].tumor_values)
    scores: list[float] = []
    model.eval()
    shard = entries[accelerator.process_index :: accelerator.num_processes]
    with torch.no_grad():
        for entry in shard:
            data = load({"image": entry["image"], "label": entry["label"]})
            image = torch.as_tensor(data["image"])[None].to(accelerator.device)
            with accelerator.autocast():
                logits = sliding_window_inference(
                    image, pipeline.roi, 4, model, overlap=config.overlap, mode="gaussian"
                )
            pred = torch.as_tensor(logits).argmax(1)[0].cpu().numpy()
            gt = np.asarray(data["label"][0])
            values = [dice(np.isin(pred, tumors), np.isin(gt, tumors))[0]]
            scores.extend(v for v in values if not math.isnan(v))
    model.train()
    gathered = accelerator.gather_for_metrics(
        torch.tensor([sum(scores), len(scores)], dtype=torch.float64, device=accelerator.device).reshape(1, 2)
    )
    total, count = gathered.reshape(-1, 2).sum(0).tolist()
    return total / count if count else float("nan")


@dataclass
class TrainSummary:
    out_dir: Path
    steps: int
    epochs: int
    best_dice: float
    losses: list[float]
    qc_acceptance: float | None
    is_main_process: bool = True


def train_segmentation(
    prepared: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainSegConfig,
    *,
    baseline: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """Train a segmentation network from a prepared data folder (see the module doc)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from monai.losses import DiceCELoss

    config = config.resolved()
    task = TASKS[config.task]
    out = Path(out_dir)
    if (out / "state").exists() and not resume:
        raise InputError(f"{out} already holds a run", hint="pass --resume to continue it, or choose another --out")
    if resume and not (out / "state").exists():
        raise InputError(f"nothing to resume in {out} (no state/ folder)")
    lists = read_task_datalist(prepared, config.task, config.fold)
    labelled = [e for e in lists["training"] if e.get("role") == "tumor-labelled"]
    organ_only = [e for e in lists["training"] if e.get("role") != "tumor-labelled"]
    assert config.labelled_repeats is not None and config.epochs is not None
    train_entries = labelled * config.labelled_repeats + (organ_only if config.mode == "freesyn" else [])
    if not train_entries:
        raise InputError(
            f"no training cases for {config.task} ({config.mode}) in fold {config.fold}",
            hint="onlylabeled needs tumor-labelled cases; check prepare's report",
        )
    model_config = model_config_for(config)
    pipeline = Pipeline(
        task=config.task, preprocessing=model_config.preprocessing(), roi=model_config.roi,
        crops_per_volume=config.crops_per_volume, pos=config.pos, neg=config.neg,
        synthesize=config.mode == "freesyn", augment=config.augment,
        geometry_only=config.mode == "freesyn" and config.synth != "rules",
    )  # fmt: skip
    accelerator = Accelerator(
        # Without an accelerator, say so: Accelerate then runs torchrun's processes as gloo CPU workers.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with="tensorboard" if has_tensorboard() else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(config.seed)
    dataset = SeededDataset(train_entries, train_transforms(pipeline, config.rules), config.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.volumes_per_batch, shuffle=True, num_workers=config.workers,
        collate_fn=collate_crops, worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(config.seed),
        persistent_workers=False,
    )  # fmt: skip
    model = build_model(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, amsgrad=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    epochs = config.epochs
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)  # per process, after sharding
    total_steps = config.max_steps or epochs * steps_per_epoch
    epochs = min(epochs, math.ceil(total_steps / max(steps_per_epoch, 1)))
    warmup = int(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total_steps)
    )
    scheduler = accelerator.prepare(scheduler)
    generator = None
    if config.mode == "freesyn" and config.synth != "rules":
        from freetumor_cli.core.train_synth import load_generator

        generator, _ = load_generator(config.synth, device=str(accelerator.device))
        generator.requires_grad_(False)
    baseline_model = None
    qc_channel: dict[str, int] = {}  # organ -> the baseline's channel meaning its tumor
    if baseline is not None:
        baseline_model, baseline_config, _ = load_checkpoint(baseline, device=str(accelerator.device))
        baseline_model.eval().requires_grad_(False)
        qc_channel = {o: TASKS[baseline_config.task].tumor_channel(o) for o in task.organs}
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    progress = {"epoch": 0, "step": 0, "best_dice": -1.0}
    if resume:
        accelerator.load_state(str(out / "state"))
        progress = json.loads((out / "state" / "progress.json").read_text(encoding="utf-8"))
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", f"# freetumor {__version__} train-seg\n" + to_yaml(config))
        labels = {
            "model_labels": model_config.labels,
            "task_remap": {str(k): v for k, v in task.region_to_task().items()},
        }
        write_text_atomic(out / "labels.json", json.dumps(labels, indent=2) + "\n")
    if accelerator.log_with:
        accelerator.init_trackers("train_seg")

    losses: list[float] = []
    qc_seen = qc_kept = 0
    step = int(progress["step"])
    model.train()
    for epoch in range(int(progress["epoch"]), epochs):
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
        done_in_epoch = step - epoch * steps_per_epoch
        batches = (
            accelerator.skip_first_batches(loader, done_in_epoch * config.grad_accum) if done_in_epoch > 0 else loader
        )
        started = time.perf_counter()
        for batch in batches:
            if step >= total_steps:
                break
            images, labels = batch["image"], batch["label"]
            stats: dict[str, float] = {}
            if generator is not None and "profile" in batch:
                # The learned map in place of the rule-based scalar, batched on the device.
                batch["image_orig"] = images
                channels = [ORGANS[task.organs[int(i)]].generator_channel for i in batch["organ_index"].flatten()]
                with torch.no_grad():
                    change = intensity_map(generator(images), channels, task.region)
                images = compose(images, batch["profile"], change, float(REGIONS[task.region].tumor_sign))
            if "synth_mask" in batch:
                synth = batch["synth_mask"].bool()
                has = synth.flatten(1).any(1)
                if baseline_model is not None and bool(has.any()):
                    with torch.no_grad(), accelerator.autocast():
                        probs = torch.softmax(baseline_model(images).float(), 1)
                    classes = []
                    for b in range(images.shape[0]):
                        values = labels[b][synth[b]].long().unique().tolist()
                        # The synthetic tumor's label is its organ's task value + 1 (a crop without one: unread).
                        organ = task.organ_values.get(int(values[0]) - 1, task.organs[0]) if values else task.organs[0]
                        classes.append(qc_channel[organ])
                    accepted, shares = quality_control(probs, synth, classes, config.qc_threshold)
                    stats["qc_tumor_share"] = float(
                        np.mean([sh for sh, h in zip(shares, has.tolist(), strict=True) if h])
                    )
                    images, labels = images.clone(), labels.clone()
                    for b, ok in enumerate(accepted):
                        if bool(has[b]) and not ok:
                            images[b] = batch["image_orig"][b]
                            labels[b][synth[b]] -= 1  # back to the organ
                    qc_seen += int(has.sum())
                    qc_kept += sum(ok for ok, h in zip(accepted, has.tolist(), strict=True) if h)
                stats["synthetic_tumor_voxels"] = float(synth.sum()) / max(int(has.sum()), 1)
            if config.mode == "freesyn" and config.cutmix:
                rng = np.random.default_rng(sample_seed(config.seed, epoch, step))
                images, labels = cutmix_along_axis(images, labels, rng, alpha=config.cutmix_alpha)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = loss_fn(model(images), labels)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            mean_loss = accelerator.gather_for_metrics(loss.detach().float().reshape(1)).mean().item()
            losses.append(mean_loss)
            stats.update({"loss": mean_loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch, "step": step})
            if qc_seen:
                stats["qc_acceptance"] = qc_kept / qc_seen
            stats["crops_per_s"] = (
                images.shape[0] * accelerator.num_processes / max(time.perf_counter() - started, 1e-9)
            )
            started = time.perf_counter()
            log_metrics(accelerator, out, stats, step)
            if step % config.save_every_steps == 0:
                save_training_state(
                    accelerator, out, {"epoch": epoch, "step": step, "best_dice": progress["best_dice"]}
                )
            if on_step:
                on_step(step, total_steps, stats)
        finished_epoch = step >= (epoch + 1) * steps_per_epoch or step >= total_steps
        if finished_epoch and ((epoch + 1) % config.val_every == 0 or step >= total_steps) and lists["validation"]:
            val = _validation_dice(model, lists["validation"], pipeline, config, accelerator)
            log_metrics(accelerator, out, {"val_tumor_dice": val, "epoch": epoch, "step": step}, step)
            if accelerator.is_main_process and not math.isnan(val) and val > progress["best_dice"]:
                progress["best_dice"] = val
                save_checkpoint(
                    accelerator.unwrap_model(model),
                    model_config,
                    out / "checkpoints" / "best",
                    extra={"val_tumor_dice": val, "step": step},
                )
        progress.update({"epoch": epoch + 1, "step": step})
        if step >= total_steps:
            break
    if accelerator.is_main_process:
        save_checkpoint(
            accelerator.unwrap_model(model), model_config, out / "checkpoints" / "last", extra={"step": step}
        )
        if not (out / "checkpoints" / "best").exists():
            save_checkpoint(
                accelerator.unwrap_model(model),
                model_config,
                out / "checkpoints" / "best",
                extra={"step": step, "note": "no validation run"},
            )
    save_training_state(
        accelerator, out, {"epoch": progress["epoch"], "step": step, "best_dice": progress["best_dice"]}
    )
    if accelerator.is_main_process:
        _plot_curves(out)
    accelerator.end_training()
    return TrainSummary(
        out, step, int(progress["epoch"]), float(progress["best_dice"]), losses,
        qc_kept / qc_seen if qc_seen else None, accelerator.is_main_process,
    )  # fmt: skip


def _plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freetumor_cli.core.io import atomic_path

    rows = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_tumor_dice"]) for r in rows if "val_tumor_dice" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss (DiceCE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation tumor Dice")
        twin.set_ylabel("tumor Dice")
        twin.set_ylim(0, 1)
    fig.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
