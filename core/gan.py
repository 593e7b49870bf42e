"""The learned tumor generator's parts: networks, one voxel-role map, losses and the G and D steps.

- Generator and voxel discriminator: the Models-Genesis ``UNet3D`` (encoder blocks of two
  conv3³-BN-ReLU layers, 32·2^d → 64·2^d channels, max-pooling, depth 4, transposed-conv decoder with
  skip concatenation, 1×1 output; about 19 M parameters at 32 base channels). Parameter names follow
  that layout so the authors' released ``netG.*`` / ``netD.*`` weights map onto them.
- One label representation for every part (:func:`voxel_roles`): 0 background, 1 real tumor,
  2 synthetic ("fake") tumor. The G step, the D step and quality control all read it.
- Losses are linear in probability and averaged over the voxels they concern (DESIGN §6).

The training loop that uses these parts is not part of this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from freetumor_cli.core.registry import REGIONS, RegionName, generator_channels

BACKGROUND, REAL_TUMOR, FAKE_TUMOR = 0, 1, 2


class CropStatsNorm3d(nn.BatchNorm3d):
    """Batch norm that normalises each crop with its own statistics, in training and in use alike.

    The authors' released networks normalise with the statistics of what they are given whatever the
    mode (``ContBatchNorm3d`` passes ``training=True``), and the original runs its generator one crop at a
    time, so each crop is normalised on its own. Computed per crop (an instance norm with the batch norm's
    weights), a crop's output is the same alone and in any batch. The running statistics stay in the state
    dict (the released files' keys) but are never read or updated.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class LUConv(nn.Module):
    """conv3³ → batch norm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, batch_stats: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = (CropStatsNorm3d if batch_stats else nn.BatchNorm3d)(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _two_convs(in_channels: int, depth: int, base: int, *, double: bool = False, batch_stats: bool) -> nn.Sequential:
    if double:
        width = base * 2 ** (depth + 1)
        return nn.Sequential(
            LUConv(in_channels, width, batch_stats=batch_stats), LUConv(width, width, batch_stats=batch_stats)
        )
    width = base * 2**depth
    return nn.Sequential(
        LUConv(in_channels, width, batch_stats=batch_stats), LUConv(width, width * 2, batch_stats=batch_stats)
    )


class DownTransition(nn.Module):
    def __init__(self, in_channels: int, depth: int, base: int, last: bool, batch_stats: bool) -> None:
        super().__init__()
        self.ops = _two_convs(in_channels, depth, base, batch_stats=batch_stats)
        self.maxpool = nn.MaxPool3d(2)
        self.last = last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before_pool = self.ops(x)
        return (before_pool, before_pool) if self.last else (self.maxpool(before_pool), before_pool)


class UpTransition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, base: int, batch_stats: bool) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.ops = _two_convs(in_channels + out_channels // 2, depth, base, double=True, batch_stats=batch_stats)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), 1))


class UNet3D(nn.Module):
    """Models-Genesis 3D U-Net; returns logits of shape ``(B, n_class, X, Y, Z)`` (X, Y, Z divisible by 8).

    ``batch_stats`` makes every batch norm normalise each crop with its own statistics, in training and in
    use, as the authors' released networks are used (:class:`CropStatsNorm3d`); without it, batch norm
    normalises over the batch in training and with its running statistics in eval mode.
    """

    def __init__(self, n_class: int, *, base: int = 32, batch_stats: bool = False) -> None:
        super().__init__()
        b, s = base, batch_stats
        self.down_tr64 = DownTransition(1, 0, b, last=False, batch_stats=s)
        self.down_tr128 = DownTransition(2 * b, 1, b, last=False, batch_stats=s)
        self.down_tr256 = DownTransition(4 * b, 2, b, last=False, batch_stats=s)
        self.down_tr512 = DownTransition(8 * b, 3, b, last=True, batch_stats=s)
        self.up_tr256 = UpTransition(16 * b, 16 * b, 2, b, s)
        self.up_tr128 = UpTransition(8 * b, 8 * b, 1, b, s)
        self.up_tr64 = UpTransition(4 * b, 4 * b, 0, b, s)
        self.out_tr = nn.Conv3d(2 * b, n_class, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, skip64 = self.down_tr64(x)
        out, skip128 = self.down_tr128(out)
        out, skip256 = self.down_tr256(out)
        out, _ = self.down_tr512(out)
        out = self.up_tr256(out, skip256)
        out = self.up_tr128(out, skip128)
        out = self.up_tr64(out, skip64)
        return self.out_tr(out)


@dataclass(frozen=True)
class GanConfig:
    """Sizes and weights of the adversarial setup.

    Attributes:
        region: the region; its registry entry gives the generator's output squashing (tanh abdomen,
            sigmoid chest) and, through its organs' generator channels, the number of output channels
            (abdomen: liver, pancreas, kidney; chest: one).
        base_channels: 32 for the method's 19 M-parameter networks; smaller for tests.
        adversarial_weight: λ in the generator loss (0.1 abdomen, 0.5 chest in the method).
        batch_stats: each crop normalised with its own statistics, in training and in use (the released
            networks' batch norm as the original runs them, one crop at a time; and freetumor's, so that
            a generator does in use exactly what it did in training). False: ``BatchNorm3d``, batch
            statistics in training and running statistics in use (generators written by earlier versions).
    """

    region: RegionName = "abdomen"
    base_channels: int = 32
    adversarial_weight: float = REGIONS["abdomen"].adversarial_weight
    batch_stats: bool = True

    @property
    def generator_channels(self) -> int:
        return generator_channels(self.region)


def make_generator(config: GanConfig) -> UNet3D:
    return UNet3D(config.generator_channels, base=config.base_channels, batch_stats=config.batch_stats)


def make_discriminator(config: GanConfig) -> UNet3D:
    # background, real tumor, fake tumor
    return UNet3D(3, base=config.base_channels, batch_stats=config.batch_stats)


def _gaussian_kernel(size: int = 7, sigma: float = 1.0) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]


def intensity_map(
    generator_output: torch.Tensor, organ_channels: Sequence[int], region: str, organ_mask: torch.Tensor
) -> torch.Tensor:
    """The per-voxel intensity change of each crop: its organ's channel, squashed, kept to the organ
    (where the region's original does), then blurred.

    Args:
        generator_output: ``(B, C, X, Y, Z)`` raw generator output.
        organ_channels: per crop, the channel of the crop's organ.
        region: the region (its generator activation: tanh or sigmoid; whether the map is set to 0
            outside the organ before the blur, so that it fades at the organ's edge).
        organ_mask: ``(B, 1, X, Y, Z)``, each crop's tumor organ before synthesis (:func:`organ_voxels`).

    Returns:
        ``(B, 1, X, Y, Z)``, blurred by a Gaussian of size 7 and σ 1.
    """
    index = torch.as_tensor(list(organ_channels), device=generator_output.device)
    chosen = generator_output[torch.arange(len(index), device=index.device), index][:, None]
    squashed = torch.tanh(chosen) if REGIONS[region].generator_activation == "tanh" else torch.sigmoid(chosen)
    if REGIONS[region].generator_map_in_organ:
        squashed = squashed * organ_mask.to(squashed.dtype)
    kernel = _gaussian_kernel().to(squashed)
    return nn.functional.conv3d(squashed, kernel, padding=3)


def organ_voxels(labels: torch.Tensor, synth_mask: torch.Tensor, organ_values: Sequence[int]) -> torch.Tensor:
    """Each crop's tumor organ as it was before synthesis: its organ's voxels and the synthetic tumor's
    (placed in the organ); real tumors are not organ. Shapes ``(B, 1, X, Y, Z)``; bool.

    Args:
        labels: task-space labels (the synthetic tumor marked as tumor).
        synth_mask: the synthetic tumor's voxels.
        organ_values: per crop, the task value of its tumor's organ.
    """
    values = torch.as_tensor(list(organ_values), device=labels.device, dtype=labels.dtype).reshape(-1, 1, 1, 1, 1)
    return (labels == values) | synth_mask.bool()


def compose(image: torch.Tensor, profile: torch.Tensor, change: torch.Tensor, sign: float) -> torch.Tensor:
    """``image + sign · profile · change``, clamped to [0, 1]; all ``(B, 1, X, Y, Z)``.

    ``profile`` is the rule-based engine's ``blur(mask) · texture`` inside the organ (zero elsewhere),
    so the learned map only replaces the engine's scalar intensity change.
    """
    return (image + sign * profile * change).clamp(0.0, 1.0)


def voxel_roles(labels: torch.Tensor, synth_mask: torch.Tensor, tumor_values: Sequence[int]) -> torch.Tensor:
    """One label representation for G, D and QC: 0 background, 1 real tumor, 2 synthetic tumor.

    Args:
        labels: ``(B, 1, X, Y, Z)`` labels in the task's space (real tumors at ``tumor_values``).
        synth_mask: bool ``(B, 1, X, Y, Z)``, the synthetic tumor voxels.
        tumor_values: label values that mean tumor.
    """
    roles = torch.zeros_like(labels, dtype=torch.long)
    real = torch.zeros_like(synth_mask, dtype=torch.bool)
    for value in tumor_values:
        real |= labels == value
    roles[real & ~synth_mask] = REAL_TUMOR
    roles[synth_mask] = FAKE_TUMOR
    return roles


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


def generator_loss(
    d_probs: torch.Tensor, seg_tumor_prob: torch.Tensor, roles: torch.Tensor, adversarial_weight: float
) -> torch.Tensor:
    """λ·(1 − P_D(real | fake voxels)) + (1 − P_seg(tumor | fake voxels)), means over the fake voxels."""
    fake = (roles == FAKE_TUMOR).float()
    fool_d = 1.0 - _masked_mean(d_probs[:, REAL_TUMOR : REAL_TUMOR + 1], fake)
    fool_seg = 1.0 - _masked_mean(seg_tumor_prob, fake)
    return adversarial_weight * fool_d + fool_seg


def discriminator_loss(d_probs: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """½[(1 − P_D(fake | fake voxels)) + (1 − P_D(real | real-tumor voxels))]."""
    fake = (roles == FAKE_TUMOR).float()
    real = (roles == REAL_TUMOR).float()
    terms = []
    if bool(fake.any()):
        terms.append(1.0 - _masked_mean(d_probs[:, FAKE_TUMOR : FAKE_TUMOR + 1], fake))
    if bool(real.any()):
        terms.append(1.0 - _masked_mean(d_probs[:, REAL_TUMOR : REAL_TUMOR + 1], real))
    if not terms:
        return d_probs.sum() * 0.0
    return 0.5 * sum(terms)  # type: ignore[return-value]


@dataclass
class GanBatch:
    """What one adversarial step needs, all ``(B, 1, X, Y, Z)`` on the device.

    Attributes:
        image: crops before synthesis, [0, 1].
        labels: task-space labels (real tumors included).
        synth_mask: where the synthetic tumors are (from the rule-based geometry).
        profile: blur(mask) · texture of those tumors, inside the organ (zero elsewhere).
        organ_channels: per crop, the generator channel of its organ.
        tumor_values: label values meaning tumor in ``labels``.
        seg_tumor_channels: per crop, the critic's channel meaning tumor of its organ.
        organ_mask: each crop's tumor organ before synthesis (:func:`organ_voxels`).
    """

    image: torch.Tensor
    labels: torch.Tensor
    synth_mask: torch.Tensor
    profile: torch.Tensor
    organ_channels: Sequence[int]
    tumor_values: Sequence[int]
    seg_tumor_channels: Sequence[int]
    organ_mask: torch.Tensor


def synthesize_batch(generator: nn.Module, batch: GanBatch, region: str) -> torch.Tensor:
    """Crops with the generator's tumors: the learned map in place of the rule-based scalar."""
    change = intensity_map(generator(batch.image), batch.organ_channels, region, batch.organ_mask)
    return compose(batch.image, batch.profile, change, float(REGIONS[region].tumor_sign))


def _critic_tumor_prob(critic: nn.Module, images: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    probs = torch.softmax(critic(images), 1)
    index = torch.as_tensor(list(channels), device=probs.device)
    return probs[torch.arange(len(index), device=probs.device), index][:, None]


def generator_step(
    generator: nn.Module,
    discriminator: nn.Module,
    critic: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: GanBatch,
    config: GanConfig,
    *,
    backward: Any = None,
) -> tuple[float, torch.Tensor]:
    """One generator update; the discriminator and the critic only score. Returns (loss, fake crops)."""
    optimizer.zero_grad(set_to_none=True)
    fake = synthesize_batch(generator, batch, config.region)
    roles = voxel_roles(batch.labels, batch.synth_mask, batch.tumor_values)
    with judging(discriminator):
        d_probs = torch.softmax(discriminator(fake), 1)
        seg_prob = _critic_tumor_prob(critic, fake, batch.seg_tumor_channels)
        loss = generator_loss(d_probs, seg_prob, roles, config.adversarial_weight)
        (backward or (lambda value: value.backward()))(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # nothing of this step leaks into the D step
    return float(loss.detach()), fake.detach()


@contextmanager
def judging(module: nn.Module) -> Iterator[None]:
    """Use ``module`` to score without changing it: no parameter gradients, batch-norm statistics kept."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])


def discriminator_step(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    fake: torch.Tensor,
    batch: GanBatch,
    *,
    backward: Any = None,
) -> float:
    """One discriminator update on detached synthetic crops, with the same voxel roles as the G step."""
    optimizer.zero_grad(set_to_none=True)
    roles = voxel_roles(batch.labels, batch.synth_mask, batch.tumor_values)
    loss = discriminator_loss(torch.softmax(discriminator(fake.detach()), 1), roles)
    (backward or (lambda value: value.backward()))(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def freeze_critic(critic: nn.Module) -> nn.Module:
    """Eval mode (batch norm uses running statistics) and no gradients, for good."""
    critic.eval()
    critic.requires_grad_(False)
    return critic
