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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli.core.checkpoints import (
    GeneratorCard,
    initialize_from,
    load_checkpoint,
    load_generator,
    save_checkpoint,
)
from freetumor_cli.core.config import to_yaml
from freetumor_cli.core.engines import wrong_contrast
from freetumor_cli.core.errors import ConfigError, InputError
from freetumor_cli.core.memory import activation_bytes, estimate, parameter_count
from freetumor_cli.core.models import ModelConfig, build_model
from freetumor_cli.core.outputs import write_text_atomic
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.registry import TASKS
from freetumor_cli.core.seg_data import (
    CropDataset,
    Pipeline,
    SegBatch,
    case_for_validation,
    crop_transforms,
    cutmix_along_axis,
    learned_intensity,
    quality_controlled,
    read_task_datalist,
    sample_seed,
)
from freetumor_cli.core.stage_configs import TrainSegConfig
from freetumor_cli.core.training import (
    Schedule,
    StoreFallback,
    case_source,
    check_run_folder,
    check_step_fits,
    fused_update,
    gathered_list,
    gathered_sum,
    locked_run,
    log_metrics,
    make_accelerator,
    make_loader,
    note,
    out_of_memory_is_an_error,
    read_metrics,
    record_incidents,
    save_training_state,
    start_run,
    version_header,
)


def check_sees_as_run(what: str, source: object, run: ModelConfig, preprocessing: Preprocessing, roi: Any) -> None:
    """A network that works on the run's crops (quality-control baseline, generator) must see them as it
    was trained to: its ``preprocessing`` (region, spacing, window) and crop ``roi`` are the run's.

    Raises:
        ConfigError: naming the first setting that differs, and how to make them agree.
    """
    ours, theirs = run.preprocessing, preprocessing
    fixes = {
        "region": f"use a {what} trained for the {run.region}",
        "spacing_mm": f"train the {what} at the run's spacing, or set the run's: --set spacing_mm={list(theirs.spacing_mm)}",
        "window_hu": f"train the {what} with the {run.region}'s window {list(ours.window_hu)}",
        "orientation": f"prepare the run's data in the {what}'s orientation {theirs.orientation}",
        "roi": f"train the {what} on the run's crop, or set the run's: --set roi={list(roi)}",
    }
    for key, mine, its in (
        ("region", ours.region, theirs.region),
        ("spacing_mm", tuple(ours.spacing_mm), tuple(theirs.spacing_mm)),
        ("window_hu", tuple(ours.window_hu), tuple(theirs.window_hu)),
        ("orientation", ours.orientation, theirs.orientation),
        ("roi", tuple(run.roi), tuple(int(n) for n in roi)),
    ):
        if mine != its:
            raise ConfigError(
                f"the {what} {source} was trained with {key} {its}, this run uses {mine}", hint=fixes[key]
            )


def check_quality_control_baseline(baseline: ModelConfig, run: ModelConfig, source: object) -> dict[str, int]:
    """A quality-control baseline must see the crops as it was trained to (:func:`check_sees_as_run`) and
    segment the tumors of every organ of the run's task.

    Returns:
        organ -> the baseline's output channel meaning that organ's tumor (a 2-class COVID-19 baseline: 1).

    Raises:
        ConfigError: naming what differs.
    """
    check_sees_as_run("quality-control baseline", source, run, baseline.preprocessing, baseline.roi)
    return {o: baseline.tumor_channel(o) for o in TASKS[run.task].organs}


def check_generator(card: GeneratorCard, run: ModelConfig, source: object) -> None:
    """A generator must see the run's crops as it was trained to: its region, spacing, window and crop
    (its card, ``generator.json``) are the run's (:func:`check_sees_as_run`)."""
    check_sees_as_run("generator", source, run, card.preprocessing, card.roi)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine to 0, per iteration."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def model_config_for(config: TrainSegConfig) -> ModelConfig:
    """The network's configuration: its task's label space and the run's preprocessing, from a resolved
    ``config`` (:meth:`TrainSegConfig.resolved`, done once where a run starts)."""
    if config.roi is None or config.spacing_mm is None:
        raise ValueError("model_config_for needs a resolved configuration: pass config.resolved()")
    task = TASKS[config.task]
    preprocessing = Preprocessing.for_region(task.region, spacing_mm=config.spacing_mm)
    return ModelConfig(
        name=config.model,
        out_channels=task.out_channels,
        roi=config.roi,
        task=task.name,
        preprocessing=preprocessing,
        labels={str(k): v for k, v in task.labels.items()},
    )


def validation_dice(
    model: Any,
    entries: list[dict[str, Any]],
    source: Any,
    config: TrainSegConfig,
    roi: Any,
    accelerator: Any,
    out: Path | None = None,
    on_case: Callable[[], None] | None = None,
) -> float:
    """Mean tumor Dice over validation cases (sliding window, overlap, Gaussian blending), all processes.

    Each process scores its share of the cases with the unwrapped network: a DDP forward would broadcast
    buffers, a collective that hangs or pairs wrongly when the shares differ in length (fewer cases than
    processes, or a share that N does not divide). The sums are gathered once, afterwards, by every process.
    A case that cannot be read is left out, with a line in ``out``'s ``run.log``, instead of stopping the run.
    """
    import torch
    from monai.inferers import sliding_window_inference

    from freetumor_cli.core.metrics import dice
    from freetumor_cli.core.seg_data import case_name, one_line

    network = accelerator.unwrap_model(model)
    tumors = list(TASKS[config.task].tumor_values)
    total = count = 0.0
    left_out: list[str] = []
    network.eval()
    with torch.no_grad():
        for entry in entries[accelerator.process_index :: accelerator.num_processes]:
            try:
                image, gt = case_for_validation(source, entry, config.task)
            except (InputError, OSError, ValueError, RuntimeError) as exc:
                left_out.append(f"validation case {case_name(entry)} left out: {one_line(exc)}")
                continue
            x = torch.from_numpy(image)[None, None].to(accelerator.device)
            with accelerator.autocast():
                logits = sliding_window_inference(x, roi, 4, network, overlap=config.overlap, mode="gaussian")
            pred = torch.as_tensor(logits).argmax(1)[0].cpu().numpy()
            score = dice(np.isin(pred, tumors), np.isin(gt, tumors))[0]
            if not math.isnan(score):
                total, count = total + score, count + 1
            if on_case:
                on_case()
    network.train()
    total, count, failed = gathered_sum(accelerator, total, count, len(left_out))
    if failed:
        from accelerate.utils import gather_object

        for line in gather_object(left_out) if accelerator.num_processes > 1 else left_out:
            if out is not None:
                note(accelerator, out, line)
    return total / count if count else float("nan")


def _validate(
    model: Any,
    entries: list[dict[str, Any]],
    source: Any,
    config: TrainSegConfig,
    pipeline: Pipeline,
    accelerator: Any,
    out: Path,
    step: int,
    on_validation: Callable[[int, int], None] | None,
) -> float:
    """One validation, with its progress and its result in the run's log."""
    mine = len(entries[accelerator.process_index :: accelerator.num_processes])
    done = [0]

    def on_case() -> None:
        done[0] += 1
        if on_validation:
            on_validation(done[0], mine)

    started = time.perf_counter()
    if on_validation:
        on_validation(0, mine)
    val = validation_dice(model, entries, source, config, pipeline.roi, accelerator, out, on_case)
    result = f"tumor Dice {val:.4f}" if not math.isnan(val) else "tumor Dice n/a (no validation case holds a tumor)"
    note(
        accelerator,
        out,
        f"step {step}: validation {result} on {len(entries)} case(s), {time.perf_counter() - started:.0f} s",
    )
    return val


def validation_outcome(
    progress: dict[str, Any], entries: list[dict[str, Any]], config: TrainSegConfig, step: int, steps_per_epoch: int
) -> str:
    """How a run's validation went, in one sentence: its best Dice, or why it has none."""
    if progress["best_dice"] >= 0:
        return f"best validation tumor Dice {progress['best_dice']:.4f} ({progress['validations']} validation(s))"
    if not entries:
        return (
            f"no validation: fold {config.fold} of {config.task} has no validation case (prepare_report.md; "
            "fewer --folds put cases in every fold)"
        )
    if progress["validations"]:
        return (
            f"validation tumor Dice n/a: none of the {len(entries)} validation case(s) of fold {config.fold} holds "
            "a tumor (prepare_report.md; another --fold, or fewer --folds)"
        )
    if step < steps_per_epoch:
        return f"validation skipped: the run stopped at step {step}, before its first epoch ended"
    if step < config.val_min_steps:
        return (
            f"validation skipped: the run's {step} steps are fewer than val_min_steps ({config.val_min_steps}; "
            "--set val_min_steps=1 validates short runs)"
        )
    return f"validation skipped: the run stopped mid-epoch at step {step}, before an epoch end where one was due"


@dataclass
class TrainSummary:
    out_dir: Path
    steps: int
    epochs: int
    best_dice: float
    losses: list[float]
    qc_acceptance: float | None
    is_main_process: bool = True
    data: str = ""
    validation: str = ""  # how validation went, in a sentence (also the last line about it in run.log)


@dataclass
class SegRun:
    """A segmentation run, set up: what its loop reads (:func:`set_up_run`)."""

    config: TrainSegConfig
    out: Path
    lists: dict[str, list[dict[str, Any]]]
    model_config: ModelConfig
    pipeline: Pipeline
    accelerator: Any
    source: Any
    train_entries: list[dict[str, Any]]
    dataset: CropDataset
    loader: Any
    model: Any
    optimizer: Any
    plan: Schedule
    warmup_steps: int
    progress: dict[str, Any]
    generator: Any = None
    channels: dict[str, int] = field(default_factory=dict)
    baseline_model: Any = None
    qc_channels: dict[str, int] = field(default_factory=dict)

    def learning_rate(self, step: int) -> float:
        """The rate of optimizer step ``step``: a pure function of the step, set by the loop before each
        step, so the same on any number of processes (a prepared scheduler steps once per process) and
        nothing to save (Accelerate would pickle a scheduler's state and load it back without weights_only)."""
        factor = lr_factor(step, warmup_steps=self.warmup_steps, total_steps=self.plan.total_steps)
        return self.config.lr * factor


def training_entries(config: TrainSegConfig, lists: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """An epoch's cases: the tumor-labelled ones repeated (:meth:`TrainSegConfig.repeats`), and with
    ``freesyn`` the organ-only ones once."""
    labelled = [e for e in lists["training"] if e.get("role") == "tumor-labelled"]
    organ_only = [e for e in lists["training"] if e.get("role") != "tumor-labelled"]
    entries = [e for e in labelled for _ in range(config.repeats(str(e.get("dataset", ""))))]
    entries += organ_only if config.mode == "freesyn" else []
    if not entries:
        raise InputError(
            f"no training cases for {config.task} ({config.mode}) in fold {config.fold}",
            hint="onlylabeled needs tumor-labelled cases; check prepare's report",
        )
    return entries


def set_up_run(
    prepared: str | os.PathLike[str], out: Path, config: TrainSegConfig, *, baseline: Any, resume: bool, device: str
) -> SegRun:
    """Everything a run's loop needs, from a resolved ``config``: the data, the network and its optimizer
    (prepared by Accelerate), the generator and quality-control baseline it names, and its progress
    (new, or as saved); its notes are in ``run.log``."""
    import torch
    from accelerate.utils import set_seed

    task = TASKS[config.task]
    check_run_folder(out, resume)
    lists = read_task_datalist(prepared, config.task, config.fold)
    assert config.epochs is not None
    train_entries = training_entries(config, lists)
    model_config = model_config_for(config)
    pipeline = Pipeline(
        task=config.task, preprocessing=model_config.preprocessing, roi=model_config.roi,
        crops_per_volume=config.crops_per_volume, pos=config.pos, neg=config.neg,
        synthesize=config.mode == "freesyn", augment=config.augment,
        geometry_only=config.mode == "freesyn" and config.engine == "generator", synth_prob=config.synth_prob,
    )  # fmt: skip
    accelerator = make_accelerator(
        out, device=device, mixed_precision=config.mixed_precision, grad_accum=config.grad_accum
    )
    set_seed(config.seed)
    source = case_source(prepared, pipeline.preprocessing)
    dataset = CropDataset(train_entries, source, pipeline, crop_transforms(pipeline, config.rules), config.seed)
    loader = make_loader(dataset, batch_size=config.volumes_per_batch, workers=config.workers, seed=config.seed)
    model = build_model(model_config)
    check_step_fits(
        accelerator,
        lambda where: estimate(
            device=where,
            crops_per_step=config.volumes_per_batch * config.crops_per_volume,
            activation_per_crop=activation_bytes(
                model_config.name, model_config.roi, feature_size=model_config.feature_size
            ),
            trained_parameters=parameter_count(model),
            mixed_precision=config.mixed_precision,
            workers=config.workers,
        ),
        suggestion="use --model unet, fewer crops (--set crops_per_volume=1), a smaller --set roi=[...], or a GPU",
    )
    init_report = initialize_from(model, config.init) if config.init and not resume else None
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, amsgrad=True,
        fused=fused_update(accelerator.device),
    )  # fmt: skip
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plan = Schedule.of(len(loader), grad_accum=config.grad_accum, epochs=config.epochs, max_steps=config.max_steps)

    generator, channels, baseline_model, qc_channels, generator_contrast = None, {}, None, {}, None
    if pipeline.geometry_only:
        generator = load_generator(config.synth, device=str(accelerator.device))
        check_generator(generator.card, model_config, config.synth)
        generator.module.requires_grad_(False)
        channels = {o: generator.channel(o) for o in task.organs}
        measured = generator.card.extra.get("hu_contrast")  # on train-synth's held-out crops, when it was chosen
        generator_contrast = wrong_contrast(
            task.region, float(measured or 0.0), f"the generator {config.synth}'s tumors"
        )
    if baseline is None and generator is not None and generator.critic is not None:
        baseline = f"{config.synth} (netSeg)"  # the original's quality control uses TGAN.pt's own baseline
        baseline_model, baseline_config = generator.critic
    elif baseline is not None:
        baseline_model, baseline_config, _ = load_checkpoint(baseline, device=str(accelerator.device))
    if baseline_model is not None:
        baseline_model.to(accelerator.device).eval().requires_grad_(False)
        qc_channels = check_quality_control_baseline(baseline_config, model_config, baseline)
    labels_json = {
        "model_labels": model_config.labels,
        "task_remap": {str(k): v for k, v in task.region_to_task().items()},
    }
    progress = start_run(
        accelerator, out, resume=resume, tracker="train_seg", optimizers=(optimizer,),
        files={"config.yaml": version_header("train-seg") + to_yaml(config), "labels.json": json.dumps(labels_json, indent=2) + "\n"},
        initial={
            "epoch": 0, "step": 0, "best_dice": -1.0, "qc_seen": 0, "qc_kept": 0, "validations": 0, "validated_at": 0,
            "bad_samples": 0,
        },
    )  # fmt: skip
    note(accelerator, out, f"data: {source.describe()}")
    if baseline_model is not None:
        note(accelerator, out, f"quality control: {baseline} (threshold {config.qc_threshold})")
    if generator_contrast:
        note(accelerator, out, f"warning: {generator_contrast}")
    if init_report is not None:
        note(accelerator, out, init_report.summary())
        if accelerator.is_main_process:
            write_text_atomic(out / "init.json", json.dumps(asdict(init_report), indent=1) + "\n")
    note(
        accelerator,
        out,
        f"{accelerator.num_processes} process(es), {plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps",
    )
    return SegRun(
        config, out, lists, model_config, pipeline, accelerator, source, train_entries, dataset, loader, model,
        optimizer, plan, int(config.warmup_epochs * plan.steps_per_epoch), progress, generator, channels,
        baseline_model, qc_channels,
    )  # fmt: skip


def synthetic_batch(run: SegRun, raw: dict[str, Any], stats: dict[str, Any]) -> SegBatch:
    """The batch the network trains on: the generator's intensity when the run has one, then quality
    control when it has a baseline; what they did goes into ``stats`` (and the run's QC counts)."""
    batch = SegBatch.of(raw)
    accelerator, config = run.accelerator, run.config
    if run.generator is not None:
        batch = learned_intensity(batch, run.generator.module, config.task, run.channels)
    if run.baseline_model is not None and batch.synth_mask is not None:
        batch, qc = quality_controlled(
            batch, run.baseline_model, run.qc_channels, config.task, config.qc_threshold, accelerator.autocast
        )
        seen, kept, share = gathered_sum(accelerator, qc.seen, qc.kept, qc.share * qc.seen)
        run.progress["qc_seen"] += int(seen)
        run.progress["qc_kept"] += int(kept)
        if seen:
            stats["qc_tumor_share"] = share / seen
    if batch.synth_mask is not None:
        voxels, crops = gathered_sum(
            accelerator, float(batch.synth_mask.sum()), float(batch.synth_mask.flatten(1).any(1).sum())
        )
        stats["synthetic_crops"] = crops
        stats["synthetic_tumor_voxels"] = voxels / max(crops, 1)
    return batch


def step_record(run: SegRun, raw: dict[str, Any], stats: dict[str, Any], seconds: float, crops: int) -> dict[str, Any]:
    """``stats`` with what every step logs besides its loss: the samples, the store's share, QC acceptance,
    bad samples and the crop rate, the same on every process."""
    accelerator, progress = run.accelerator, run.progress
    stats["samples"] = gathered_list(accelerator, raw["sample_index"][:: run.config.crops_per_volume])
    stats["store_share"] = (
        gathered_sum(accelerator, float(raw["from_store"].float().mean()))[0] / accelerator.num_processes
    )
    if progress["qc_seen"]:
        stats["qc_acceptance"] = progress["qc_kept"] / progress["qc_seen"]
    stats["bad_samples"] = progress["bad_samples"]
    stats["crops_per_s"] = crops * accelerator.num_processes / max(seconds, 1e-9)
    return stats


@locked_run("train-seg")
def train_segmentation(
    prepared: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainSegConfig,
    *,
    baseline: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    on_validation: Callable[[int, int], None] | None = None,
    device: str = "auto",
) -> TrainSummary:
    """Train a segmentation network from a prepared data folder (see the module doc).

    ``device`` is ``auto`` (the GPU the launcher gives each process, else the CPU), ``cpu`` or ``cuda:N``.
    ``on_validation(done, total)`` follows the validation cases of this process.
    """
    from monai.losses import DiceCELoss

    config = config.resolved()
    out = Path(out_dir)
    run = set_up_run(prepared, out, config, baseline=baseline, resume=resume, device=device)
    accelerator, model, optimizer, plan, progress = run.accelerator, run.model, run.optimizer, run.plan, run.progress
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    losses: list[float] = []
    store_fallback = StoreFallback(run.source, run.train_entries)
    step = int(progress["step"])
    model.train()
    with out_of_memory_is_an_error(out, accelerator.device, lambda: step + 1):
        for epoch in range(int(progress["epoch"]), plan.epochs):
            run.dataset.set_epoch(epoch)
            run.loader.set_epoch(epoch)
            skip = plan.batches_to_skip(step, epoch, config.grad_accum)
            started = time.perf_counter()
            for raw in accelerator.skip_first_batches(run.loader, skip) if skip else run.loader:
                if step >= plan.total_steps:
                    break
                stats: dict[str, Any] = {}
                record_incidents(accelerator, out, raw["incidents"], progress)
                batch = synthetic_batch(run, raw, stats)
                images, labels = batch.image, batch.label
                if config.cutmix:
                    rng = np.random.default_rng(sample_seed(config.seed, epoch, step))
                    images, labels = cutmix_along_axis(images, labels, rng, alpha=config.cutmix_alpha)
                lr = run.learning_rate(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = loss_fn(model(images), labels)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                mean_loss = gathered_sum(accelerator, float(loss.detach()))[0] / accelerator.num_processes
                losses.append(mean_loss)
                stats.update({"loss": mean_loss, "lr": lr, "epoch": epoch, "step": step})  # the step's own rate
                step_record(run, raw, stats, time.perf_counter() - started, images.shape[0])
                started = time.perf_counter()
                store_fallback.check(accelerator, out, stats["store_share"], raw, step)
                log_metrics(accelerator, out, stats, step)
                if step % config.save_every_steps == 0:
                    save_training_state(accelerator, out, {**progress, "epoch": epoch, "step": step})
                if on_step:
                    on_step(step, plan.total_steps, stats)
            # Validation closes whole epochs (a run that --max-steps stops mid-epoch skips it): every
            # val_every epochs and at the end, at least val_min_steps steps after the last one or the start.
            finished_epoch = step >= (epoch + 1) * plan.steps_per_epoch
            due = (epoch + 1) % config.val_every == 0 or step >= plan.total_steps
            if (
                finished_epoch
                and due
                and run.lists["validation"]
                and step - progress["validated_at"] >= config.val_min_steps
            ):
                validate_and_keep_best(run, epoch, step, on_validation)
            progress.update({"epoch": epoch + 1, "step": step})
            if step >= plan.total_steps:
                break
    return finish_run(run, step, losses)


def validate_and_keep_best(run: SegRun, epoch: int, step: int, on_validation: Any) -> None:
    """Validate the network at ``step``, log its tumor Dice and keep it as ``checkpoints/best`` when best."""
    accelerator, progress = run.accelerator, run.progress
    val = _validate(
        run.model, run.lists["validation"], run.source, run.config, run.pipeline, accelerator, run.out, step,
        on_validation,
    )  # fmt: skip
    progress.update({"validations": progress["validations"] + 1, "validated_at": step})
    log_metrics(accelerator, run.out, {"val_tumor_dice": val, "epoch": epoch, "step": step}, step)
    if accelerator.is_main_process and not math.isnan(val) and val > progress["best_dice"]:
        progress["best_dice"] = val
        save_checkpoint(
            accelerator.unwrap_model(run.model), run.model_config, run.out / "checkpoints" / "best",
            extra={"val_tumor_dice": val, "step": step},
        )  # fmt: skip


def finish_run(run: SegRun, step: int, losses: list[float]) -> TrainSummary:
    """Write the last (and, without a validated one, the best) checkpoint, the state and the curves."""
    accelerator, progress, out = run.accelerator, run.progress, run.out
    validation = validation_outcome(progress, run.lists["validation"], run.config, step, run.plan.steps_per_epoch)
    note(accelerator, out, validation)
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(run.model)
        save_checkpoint(final, run.model_config, out / "checkpoints" / "last", extra={"step": step})
        if not (out / "checkpoints" / "best").exists():
            save_checkpoint(
                final, run.model_config, out / "checkpoints" / "best", extra={"step": step, "note": validation}
            )
    save_training_state(accelerator, out, progress)
    if accelerator.is_main_process:
        _plot_curves(out)
    accelerator.end_training()
    qc_rate = progress["qc_kept"] / progress["qc_seen"] if progress["qc_seen"] else None
    return TrainSummary(
        out, step, int(progress["epoch"]), float(progress["best_dice"]), losses, qc_rate,
        accelerator.is_main_process, run.source.describe(), validation,
    )  # fmt: skip


def _plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freetumor_cli.core.outputs import atomic_path

    rows = read_metrics(out / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_tumor_dice"]) for r in rows if r.get("val_tumor_dice") is not None]  # null: no tumor
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss (DiceCE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles = ax.get_legend_handles_labels()
    if val:
        twin = ax.twinx()
        twin.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation tumor Dice")
        twin.set_ylabel("tumor Dice")
        twin.set_ylim(-0.03, 1.03)  # a Dice of 0 or 1 shows whole
        more = twin.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    if handles[0]:
        ax.legend(*handles, loc="upper right", fontsize=8)  # one legend inside the axes, for both curves
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
