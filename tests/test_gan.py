"""The generator's parts at tiny scale: networks, voxel roles, losses, and the G and D steps."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from freetumor_cli.core.gan import (  # noqa: E402
    FAKE_TUMOR,
    REAL_TUMOR,
    GanBatch,
    GanConfig,
    UNet3D,
    discriminator_loss,
    discriminator_step,
    freeze_critic,
    generator_loss,
    generator_step,
    make_discriminator,
    make_generator,
    map_released_state_dict,
    voxel_roles,
)


def test_reference_generator_has_about_19m_parameters() -> None:
    n = sum(p.numel() for p in make_generator(GanConfig()).parameters())
    assert 18e6 < n < 20e6, n
    assert make_generator(GanConfig(region="chest", base_channels=4))(torch.zeros(1, 1, 16, 16, 16)).shape == (
        1,
        1,
        16,
        16,
        16,
    )


def test_voxel_roles_one_representation() -> None:
    labels = torch.zeros(1, 1, 4, 4, 4)
    labels[0, 0, 0] = 2  # a real tumor
    labels[0, 0, 1] = 1  # organ
    synth = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    synth[0, 0, 2] = True
    labels[0, 0, 2] = 2  # the synthetic tumor is labelled tumor too
    roles = voxel_roles(labels, synth, [2])
    assert (roles[0, 0, 0] == REAL_TUMOR).all() and (roles[0, 0, 2] == FAKE_TUMOR).all()
    assert (roles[0, 0, 1] == 0).all() and (roles[0, 0, 3] == 0).all()


def test_losses_hand_computed() -> None:
    roles = torch.tensor([0, 1, 2, 2]).reshape(1, 1, 4, 1, 1)
    d = torch.zeros(1, 3, 4, 1, 1)
    d[0, :, 1, 0, 0] = torch.tensor([0.0, 0.8, 0.2])  # a real-tumor voxel
    d[0, :, 2, 0, 0] = torch.tensor([0.0, 0.5, 0.5])
    d[0, :, 3, 0, 0] = torch.tensor([0.0, 0.3, 0.7])
    seg = torch.tensor([0.0, 0.0, 0.6, 1.0]).reshape(1, 1, 4, 1, 1)
    # G: 0.1 * (1 - mean(0.5, 0.3)) + (1 - mean(0.6, 1.0)) = 0.06 + 0.2
    assert float(generator_loss(d, seg, roles, 0.1)) == pytest.approx(0.26)
    # D: 0.5 * ((1 - mean(0.5, 0.7)) + (1 - 0.8)) = 0.5 * (0.4 + 0.2)
    assert float(discriminator_loss(d, roles)) == pytest.approx(0.3)


def tiny_batch() -> GanBatch:
    gen = torch.Generator().manual_seed(0)
    shape = (2, 1, 16, 16, 16)
    image = torch.rand(shape, generator=gen)
    organ = torch.zeros(shape)
    organ[:, :, 2:14, 2:14, 2:14] = 1
    synth = torch.zeros(shape, dtype=torch.bool)
    synth[:, :, 5:10, 5:10, 5:10] = True
    labels = organ.clone()
    labels[synth] = 2
    labels[0, 0, 11:13, 11:13, 11:13] = 2  # a real tumor in crop 0
    return GanBatch(
        image=image, labels=labels, synth_mask=synth, profile=synth.float() * 0.5 * organ,
        organ_channels=[0, 1], tumor_values=[2], seg_tumor_channels=[2, 2],
    )  # fmt: skip


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if v.dtype.is_floating_point)


def test_g_step_changes_only_the_generator_and_d_step_only_the_discriminator() -> None:
    torch.manual_seed(0)
    config = GanConfig(base_channels=2)
    generator, discriminator = make_generator(config), make_discriminator(config)
    critic = freeze_critic(UNet3D(3, base=2))
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.0, 0.999))
    batch = tiny_batch()
    g0, d0, c0 = snapshot(generator), snapshot(discriminator), snapshot(critic)
    _, fake = generator_step(generator, discriminator, critic, opt_g, batch, config)
    assert changed(g0, generator)
    assert not changed(d0, discriminator), "the G step touched the discriminator"
    assert not changed(c0, critic), "the critic must never change"
    assert all(p.grad is None for p in discriminator.parameters()), "G-step gradients leaked into D"
    g1, d1 = snapshot(generator), snapshot(discriminator)
    discriminator_step(discriminator, opt_d, fake, batch)
    assert changed(d1, discriminator)
    assert not changed(g1, generator), "the D step touched the generator"
    assert not changed(c0, critic)
    assert not critic.training and not any(p.requires_grad for p in critic.parameters())
    # The synthetic crops differ from the input only inside the synthetic tumors.
    outside = ~batch.synth_mask
    assert torch.allclose(fake[outside], batch.image.clamp(0, 1)[outside])
    assert not torch.allclose(fake[batch.synth_mask], batch.image[batch.synth_mask])


def test_released_checkpoint_keys_map_onto_our_modules() -> None:
    config = GanConfig(base_channels=2)
    ours_g, ours_d = make_generator(config), make_discriminator(config)
    released = {f"netG.module.{k}": v for k, v in ours_g.state_dict().items()}
    released.update({f"netD.{k}": v for k, v in ours_d.state_dict().items()})
    released["netSeg.some.weight"] = torch.zeros(1)
    fresh_g, fresh_d = make_generator(config), make_discriminator(config)
    fresh_g.load_state_dict(map_released_state_dict(released, "netG."), strict=True)
    fresh_d.load_state_dict(map_released_state_dict(released, "netD."), strict=True)
    assert not changed(snapshot(ours_g), fresh_g)
