"""Adversarial training of the tumor generator (``train-synth``), on Accelerate.

Each crop with an organ and no real tumor gets a rule-based tumor geometry in the loader (the same
engine as ``synthesize``: shape, position, texture); the generator supplies the per-voxel intensity
change in place of the engine's scalar. Per step: one generator update against the voxel
discriminator and the frozen baseline segmentor (critic), then one discriminator update on the detached
synthetic crops, with one voxel-role map for both (:mod:`freetumor_cli.core.gan`).

Every epoch, on held-out organ-only crops, it logs the quality-control pass rate (share of synthetic
tumors of which the critic calls more than ``qc_threshold`` tumor), the critic's mean tumor probability
on them and their mean HU contrast, for the generator and, once, for the rule-based engine. The best
checkpoint is the one with the highest QC pass rate (ties: higher critic tumor probability).

Run folder: ``config.yaml``, ``metrics.jsonl``, TensorBoard ``logs/``, ``previews/epoch_<k>.png``,
``checkpoints/best`` and ``checkpoints/last`` (``generator.safetensors`` + ``generator.json``), ``state/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli.core.config import to_yaml
from freetumor_cli.core.engines import RuleIntensity, wrong_contrast
from freetumor_cli.core.errors import ConfigError, InputError
from freetumor_cli.core.memory import (
    CRITIC_FRACTION,
    GAN_BYTES_PER_VOXEL_AT_BASE_32,
    activation_bytes,
    estimate,
    parameter_count,
    voxels,
)
from freetumor_cli.core.outputs import atomic_path
from freetumor_cli.core.registry import (
    REGIONS,
    TASKS,
    region_tasks,
)
from freetumor_cli.core.stage_configs import TrainSynthConfig
from freetumor_cli.core.training import (
    Schedule,
    StoreFallback,
    case_source,
    check_run_folder,
    check_step_fits,
    collate_crops,
    fused_update,
    gathered_list,
    gathered_sum,
    locked_run,
    log_metrics,
    make_accelerator,
    make_loader,
    note,
    out_of_memory_is_an_error,
    record_incidents,
    save_training_state,
    start_run,
    version_header,
)


def generator_task(baseline_task: str, region: str, baseline: Any = "the baseline") -> str:
    """The task a generator trains on: the critic's (a task of the generator's region)."""
    allowed = region_tasks(region)
    if baseline_task not in allowed:
        raise InputError(
            f"the baseline {baseline} segments {baseline_task!r}; the {region} generator needs a "
            + " / ".join(repr(a) for a in allowed)
            + " baseline",
            hint=f"train it with freetumor train-seg --organ {REGIONS[region].generalist_task} --mode onlylabeled",
        )
    return baseline_task


@dataclass
class SynthSummary:
    out_dir: Path
    steps: int
    generator_qc: list[float]
    rules_qc: float
    is_main_process: bool = True
    warnings: list[str] = field(default_factory=list)


def gan_batch(batch: Mapping[str, Any], critic: Any, task: str, channels: Mapping[str, int]) -> Any:
    """The adversarial step's batch from a collated batch of geometry-only crops (read as a
    :class:`SegBatch`): the crops, their labels, the tumors' voxels and profile, and per crop its organ's
    generator channel, the critic's tumor channel and the organ's voxels before synthesis."""
    from freetumor_cli.core.gan import GanBatch
    from freetumor_cli.core.seg_data import SegBatch, tumor_organs

    seg = SegBatch.of(batch)
    organs, organ_mask = tumor_organs(seg, task)
    return GanBatch(
        image=seg.image,
        labels=seg.label,
        synth_mask=seg.synth_mask,
        profile=seg.profile,
        organ_channels=[channels[o] for o in organs],
        tumor_values=TASKS[task].tumor_values,
        seg_tumor_channels=[critic.tumor_channel(o) for o in organs],
        organ_mask=organ_mask,
    )


HALO_HU = 25.0  # an organ voxel outside a tumor's label changed by this much (towards tumor) looks like tumor


def heldout_scores(
    images: Any, gan_batch: Any, critic: Any, threshold: float, window_width: float, sign: float = -1.0
) -> dict[str, float]:
    """QC pass rate, critic tumor probability, HU contrast and halo of synthetic tumors in ``images``.

    The contrast is the mean change inside the tumors' labels (HU); the halo, the organ voxels outside a
    label changed by at least :data:`HALO_HU` in the tumors' direction (``sign``), per labelled voxel: what
    a network trained on the sharp label learns to call organ although it looks like tumor.
    """
    import torch

    from freetumor_cli.core.seg_data import quality_control

    with torch.no_grad():
        probs = torch.softmax(critic(images).float(), 1)
    # The quality-control measure of train-seg: a tumor passes when more than ``threshold`` of it is called tumor.
    accepted, _ = quality_control(probs, gan_batch.synth_mask, gan_batch.seg_tumor_channels, threshold)
    passed, probabilities, contrasts, halo, labelled = [], [], [], 0.0, 0.0
    for b, channel in enumerate(gan_batch.seg_tumor_channels):
        mask = gan_batch.synth_mask[b, 0]
        if not bool(mask.any()):
            continue
        tumor_prob = probs[b, channel][mask]
        passed.append(float(accepted[b]))
        probabilities.append(float(tumor_prob.mean()))
        change = (images[b, 0] - gan_batch.image[b, 0]) * window_width
        contrasts.append(float(change[mask].mean()))
        outside = gan_batch.organ_mask[b, 0].bool() & ~mask
        halo += float((outside & (change * sign >= HALO_HU)).sum())
        labelled += float(mask.sum())
    if not passed:
        return {}
    return {
        "qc_pass_rate": float(np.mean(passed)),
        "critic_tumor_prob": float(np.mean(probabilities)),
        "hu_contrast": float(np.mean(contrasts)),
        "halo": halo / labelled,
    }


def score_heldout(
    generator: Any, batch: Any, critic: Any, config: TrainSynthConfig, window_width: float
) -> tuple[Any, dict[str, float]]:
    """The generator's tumors in the held-out crops and their scores (:func:`heldout_scores`).

    Pass the unwrapped generator: every process scores the same crops on its own, with no collective
    inside the forward (a DDP forward broadcasts buffers), so any number of processes computes alike.
    """
    import torch

    from freetumor_cli.core.gan import synthesize_batch

    generator.eval()
    with torch.no_grad():
        images = synthesize_batch(generator, batch, config.region)
    sign = float(REGIONS[config.region].tumor_sign)
    return images, heldout_scores(images, batch, critic, config.qc_threshold, window_width, sign)


@dataclass
class SynthRun:
    """A generator run, set up: what its loop reads (:func:`set_up_run`)."""

    config: TrainSynthConfig
    out: Path
    task: str
    accelerator: Any
    source: Any
    entries: list[dict[str, Any]]
    dataset: Any
    loader: Any
    gan: Any
    generator: Any
    discriminator: Any
    opt_g: Any
    opt_d: Any
    critic: Any
    critic_config: Any
    channels: dict[str, int]
    plan: Schedule
    progress: dict[str, Any]
    window_width: float
    save: Callable[[Any, Path, dict[str, Any]], None]
    heldout: Any = None  # the fixed held-out GAN batch, or None
    contrast_noted: bool = False  # a wrong held-out contrast was noted in run.log (once a run)
    best_contrast: str | None = None  # what is wrong with the best checkpoint's contrast, or None


def set_up_run(
    prepared: str | os.PathLike[str], out: Path, config: TrainSynthConfig, *, baseline: Any, resume: bool, device: str
) -> SynthRun:
    """Everything the generator's loop needs: the critic, the data, the generator and discriminator with
    their optimizers (prepared by Accelerate), the held-out crops, and the progress (new, or as saved);
    its notes are in ``run.log`` and the rules' held-out scores in ``metrics.jsonl``."""
    import torch
    from accelerate.utils import set_seed

    from freetumor_cli.core.checkpoints import load_checkpoint, load_generator, save_generator, trained_channels
    from freetumor_cli.core.gan import GanConfig, freeze_critic, make_discriminator, make_generator
    from freetumor_cli.core.seg_data import CropDataset, Pipeline, crop_transforms, read_task_datalist

    check_run_folder(out, resume)
    accelerator = make_accelerator(out, device=device, mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    init = load_generator(config.init, device=str(accelerator.device)) if config.init else None
    if init is not None and init.region != config.region:
        raise InputError(f"--init {config.init} is a {init.region} generator; this run is for the {config.region}")
    if baseline is not None:
        critic, critic_config, _ = load_checkpoint(baseline, device=str(accelerator.device))
    elif init is not None and init.critic is not None:
        critic, critic_config = init.critic  # the original's quality-control baseline: TGAN.pt's netSeg
        baseline = f"{config.init} (netSeg)"
    else:
        raise InputError(
            "train-synth needs a critic", hint="pass --baseline CHECKPOINT (or --init TGAN.pt, whose netSeg is one)"
        )
    task = generator_task(critic_config.task, config.region, baseline)
    check_matches_critic(config, critic_config)
    freeze_critic(critic)
    lists = read_task_datalist(prepared, task, 0)
    labelled = [e for e in lists["training"] if e.get("role") == "tumor-labelled"]
    organ_only = [e for e in lists["training"] if e.get("role") != "tumor-labelled"]
    heldout = [e for e in lists["validation"] if e.get("role") != "tumor-labelled"] or lists["validation"]
    if not labelled or not organ_only:
        raise InputError(
            "train-synth needs tumor-labelled and organ-only cases in the prepared data", hint="see prepare_report.md"
        )
    preprocessing = critic_config.preprocessing  # the critic's task is of the run's region (generator_task)
    pipeline = Pipeline(
        task=task, preprocessing=preprocessing, roi=config.roi or critic_config.roi,
        crops_per_volume=config.crops_per_volume, pos=config.pos, neg=config.neg, geometry_only=True,
    )  # fmt: skip
    source = case_source(prepared, preprocessing)
    entries = [e for e in labelled for _ in range(config.repeats(str(e.get("dataset", ""))))] + organ_only
    dataset = CropDataset(entries, source, pipeline, crop_transforms(pipeline, config.rules), config.seed)
    loader = make_loader(dataset, batch_size=config.volumes_per_batch, workers=config.workers, seed=config.seed)
    gan = GanConfig(
        region=config.region, base_channels=init.card.base_channels if init else config.base_channels,
        adversarial_weight=config.weight(), batch_stats=init.card.batch_stats if init else GanConfig.batch_stats,
    )  # fmt: skip
    generator, discriminator = make_generator(gan), make_discriminator(gan)
    check_step_fits(
        accelerator,
        lambda where: estimate(
            device=where,
            crops_per_step=config.volumes_per_batch * config.crops_per_volume,
            activation_per_crop=GAN_BYTES_PER_VOXEL_AT_BASE_32 * gan.base_channels / 32 * voxels(pipeline.roi)
            + CRITIC_FRACTION
            * activation_bytes(critic_config.name, pipeline.roi, feature_size=critic_config.feature_size),
            trained_parameters=parameter_count(generator) + parameter_count(discriminator),
            frozen_parameters=parameter_count(critic),
            mixed_precision=config.mixed_precision,
            workers=config.workers,
        ),
        suggestion="use fewer crops (--set volumes_per_batch=1), --mixed-precision bf16, or a GPU",
    )
    channels = trained_channels(task)
    if init is not None:  # fine-tune: the generator (with its channels) and, when the file has it, the discriminator
        generator.load_state_dict(init.module.state_dict())
        if init.discriminator_state is not None:
            discriminator.load_state_dict(init.discriminator_state)
        channels = {o: init.channel(o) for o in TASKS[task].organs}
    fused = fused_update(accelerator.device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=config.betas, fused=fused)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=config.betas, fused=fused)
    generator, discriminator, opt_g, opt_d, loader = accelerator.prepare(generator, discriminator, opt_g, opt_d, loader)
    fixed = _heldout_batch(heldout, source, pipeline, config, accelerator.device)

    def save(module: Any, folder: Path, extra: dict[str, Any]) -> None:
        save_generator(
            module, gan, folder, preprocessing=preprocessing, roi=pipeline.roi,
            organ_channels=channels, discriminator=accelerator.unwrap_model(discriminator),
            extra={**extra, "critic": str(baseline), **({"init": str(config.init)} if init else {})},
        )  # fmt: skip

    plan = Schedule.of(len(loader), grad_accum=1, epochs=config.epochs, max_steps=config.max_steps)
    # config.yaml holds the values in effect: the critic's crop and voxel size, the network's width and λ.
    resolved = replace(
        config, roi=tuple(pipeline.roi), spacing_mm=tuple(preprocessing.spacing_mm),
        base_channels=gan.base_channels, adversarial_weight=gan.adversarial_weight,
    )  # fmt: skip
    progress = start_run(
        accelerator, out, resume=resume, tracker="train_synth", optimizers=(opt_g, opt_d),
        files={"config.yaml": version_header("train-synth") + to_yaml(resolved)},
        initial={"epoch": 0, "step": 0, "best": [-1.0, -1.0], "bad_samples": 0},
    )  # fmt: skip
    note(accelerator, out, f"data: {source.describe()}")
    note(
        accelerator, out, f"critic: {baseline}" + (f"; generator and discriminator from {config.init}" if init else "")
    )
    note(
        accelerator,
        out,
        f"{accelerator.num_processes} process(es), {plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps",
    )
    run = SynthRun(
        config, out, task, accelerator, source, entries, dataset, loader, gan, generator, discriminator, opt_g,
        opt_d, critic, critic_config, channels, plan, progress,
        preprocessing.window_hu[1] - preprocessing.window_hu[0], save,
    )  # fmt: skip
    if fixed is not None:
        run.heldout = gan_batch(fixed, critic_config, task, channels)
    return run


def score_rules(run: SynthRun, window_hu: tuple[float, float]) -> dict[str, float]:
    """The rule-based engine's tumors in the held-out crops (same geometry), scored as the generator's."""
    config, batch = run.config, run.heldout
    rule = RuleIntensity.for_region(config.region, config.rules, window_hu=window_hu)
    sign = float(REGIONS[config.region].tumor_sign)
    images = (batch.image + rule.of_profile(batch.profile, sign, rule.mean_hu)).clamp(0, 1)
    return heldout_scores(images, batch, run.critic, config.qc_threshold, run.window_width, sign)


@locked_run("train-synth")
def train_generator(
    prepared: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainSynthConfig,
    *,
    baseline: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    device: str = "auto",
) -> SynthSummary:
    """Train the generator and the voxel discriminator (see the module doc); ``device`` as for train-seg."""
    from freetumor_cli.core.gan import discriminator_step, generator_step

    out = Path(out_dir)
    run = set_up_run(prepared, out, config, baseline=baseline, resume=resume, device=device)
    accelerator, plan, progress, generator = run.accelerator, run.plan, run.progress, run.generator
    rules_qc = float("nan")
    if run.heldout is not None:
        window = run.critic_config.preprocessing.window_hu
        rules_scores = score_rules(run, window)
        rules_qc = rules_scores.get("qc_pass_rate", float("nan"))
        if not resume:
            log_metrics(accelerator, out, {f"rules_{k}": v for k, v in rules_scores.items()} | {"step": 0}, 0)
    step = int(progress["step"])
    store_fallback = StoreFallback(run.source, run.entries)
    generator_qc: list[float] = []
    with out_of_memory_is_an_error(out, accelerator.device, lambda: step + 1):
        for epoch in range(int(progress["epoch"]), plan.epochs):
            run.dataset.set_epoch(epoch)
            run.loader.set_epoch(epoch)
            skip = plan.batches_to_skip(step, epoch, 1)
            generator.train()
            run.discriminator.train()
            for raw in accelerator.skip_first_batches(run.loader, skip) if skip else run.loader:
                if step >= plan.total_steps:
                    break
                record_incidents(accelerator, out, raw["incidents"], progress)
                batch = gan_batch(raw, run.critic_config, run.task, run.channels)
                with accelerator.autocast():
                    loss_g, fake = generator_step(
                        generator, run.discriminator, run.critic, run.opt_g, batch, run.gan,
                        backward=accelerator.backward,
                    )  # fmt: skip
                    loss_d = discriminator_step(
                        run.discriminator, run.opt_d, fake, batch, backward=accelerator.backward
                    )
                step += 1
                sum_g, sum_d, crops = gathered_sum(
                    accelerator, loss_g, loss_d, float(batch.synth_mask.flatten(1).any(1).sum())
                )
                store_share = gathered_sum(accelerator, float(raw["from_store"].float().mean()))[0]
                stats = {
                    "loss_g": sum_g / accelerator.num_processes,
                    "loss_d": sum_d / accelerator.num_processes,
                    "synthetic_crops": crops,
                    "bad_samples": progress["bad_samples"],
                    "samples": gathered_list(accelerator, raw["sample_index"][:: config.crops_per_volume]),
                    "store_share": store_share / accelerator.num_processes,
                    "epoch": epoch,
                    "step": step,
                }
                store_fallback.check(accelerator, out, stats["store_share"], raw, step)
                log_metrics(accelerator, out, stats, step)
                if step % config.save_every_steps == 0:
                    save_training_state(accelerator, out, {**progress, "epoch": epoch, "step": step})
                if on_step:
                    on_step(step, plan.total_steps, stats)
            if run.heldout is not None:
                generator_qc.append(score_epoch(run, epoch, step))
            progress.update({"epoch": epoch + 1, "step": step})
            if step >= plan.total_steps:
                break
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(generator)
        run.save(final, out / "checkpoints" / "last", {"step": step})
        if not (out / "checkpoints" / "best").exists():
            run.save(final, out / "checkpoints" / "best", {"step": step})
    save_training_state(accelerator, out, progress)
    accelerator.end_training()
    warnings = [f"the best checkpoint: {run.best_contrast}"] if run.best_contrast else []
    return SynthSummary(out, step, generator_qc, rules_qc, accelerator.is_main_process, warnings)


def score_epoch(run: SynthRun, epoch: int, step: int) -> float:
    """Score the generator on the held-out crops after an epoch: log it, preview it, keep it as
    ``checkpoints/best`` when best (QC pass rate, ties: critic tumor probability); its QC pass rate.
    A wrong contrast is noted once a run (``run.contrast_noted``), and the best checkpoint's kept
    (``run.best_contrast``)."""
    accelerator, out, progress = run.accelerator, run.out, run.progress
    images, scores = score_heldout(
        accelerator.unwrap_model(run.generator), run.heldout, run.critic, run.config, run.window_width
    )
    contrast = wrong_contrast(run.config.region, scores.get("hu_contrast", 0.0), "the generator's tumors")
    if contrast and not run.contrast_noted:
        run.contrast_noted = True
        note(accelerator, out, f"epoch {epoch + 1}, held-out crops: {contrast}")
    log_metrics(accelerator, out, {**scores, "epoch": epoch, "step": step}, step)
    key = [scores.get("qc_pass_rate", -1.0), scores.get("critic_tumor_prob", -1.0)]
    if accelerator.is_main_process:
        _preview(run.heldout, images, out / "previews" / f"epoch_{epoch:03d}.png")
    if key > progress["best"]:  # every process decides alike: the held-out batch is the same
        progress["best"] = key
        run.best_contrast = contrast
        if accelerator.is_main_process:
            run.save(accelerator.unwrap_model(run.generator), out / "checkpoints" / "best", {"epoch": epoch, **scores})
    return float(scores.get("qc_pass_rate", float("nan")))


def _heldout_batch(
    entries: list[dict[str, Any]], source: Any, pipeline: Any, config: TrainSynthConfig, device: Any
) -> dict[str, Any] | None:
    """The fixed held-out crops the generator is scored on each epoch: only as many cases as they need."""
    from freetumor_cli.core.seg_data import CropDataset, crop_transforms

    heldout = CropDataset(
        entries,
        source,
        replace(pipeline, augment=False),
        crop_transforms(replace(pipeline, augment=False), config.rules),
        config.seed + 1,
    )
    crops: list[Any] = []
    for index in range(len(heldout)):
        if len(crops) >= config.heldout_crops:
            break
        crops.extend(heldout[index])
    if not crops:
        return None
    batch = collate_crops(crops[: config.heldout_crops])
    return {k: v.to(device) for k, v in batch.items() if k != "incidents"}


def check_matches_critic(config: TrainSynthConfig, critic: Any) -> None:
    """A run's crop and voxel size must be the critic's: it judges tumors as it was trained to see them."""
    critic_spacing = critic.preprocessing.spacing_mm
    if config.spacing_mm is not None and tuple(config.spacing_mm) != tuple(critic_spacing):
        raise ConfigError(
            f"spacing_mm {list(config.spacing_mm)} differs from the critic's {list(critic_spacing)}",
            hint="leave spacing_mm unset (the critic's is used) or train a critic at that spacing",
        )
    if config.roi is not None and tuple(config.roi) != tuple(critic.roi):
        raise ConfigError(
            f"roi {list(config.roi)} differs from the critic's crop {list(critic.roi)}",
            hint="leave roi unset (the critic's is used) or train a critic on that crop",
        )


def _preview(batch: Any, images: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freetumor_cli.core.preview import displayed_slice

    rows = [b for b in range(images.shape[0]) if bool(batch.synth_mask[b].any())][:4]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 2, figsize=(5, 2.5 * len(rows)), squeeze=False)
    for r, b in enumerate(rows):
        mask = batch.synth_mask[b, 0].cpu().numpy()
        z = int(np.argmax(mask.sum(axis=(0, 1))))  # crops are RAS: axial slices, shown as synthesize's previews
        for c, (title, volume) in enumerate((("rule geometry, before", batch.image), ("generator", images))):
            crop = volume[b, 0].detach().cpu().float().numpy()
            axes[r, c].imshow(displayed_slice(crop, z, axis=2), cmap="gray", vmin=0, vmax=1, origin="upper")
            axes[r, c].contour(displayed_slice(mask, z, axis=2), levels=[0.5], colors="red", linewidths=0.6)
            axes[r, c].set_title(title, fontsize=8)
            axes[r, c].axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
