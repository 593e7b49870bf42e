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
    voxel_roles,
)
from freetumor_cli.core.preprocess import Preprocessing  # noqa: E402


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
        organ_channels=[0, 1], tumor_values=[2], seg_tumor_channels=[2, 2], organ_mask=organ.bool(),
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


@pytest.fixture(scope="module")
def gan_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    from freetumor_cli.core.prepare import PrepareConfig, prepare
    from freetumor_cli.core.train_seg import TrainSegConfig, train_segmentation

    from .conftest import write_phantom_root

    root = write_phantom_root(tmp_path_factory.mktemp("gan_root"), organ_only_seed=20)
    prepared = tmp_path_factory.mktemp("gan_prepared")
    prepare(root, prepared, PrepareConfig(folds=2, seed=1))
    runs = tmp_path_factory.mktemp("gan_runs")
    tiny = TrainSegConfig(
        task="all", model="unet-tiny", roi=(32, 32, 32), max_steps=2, workers=0, spacing_mm=(4.0, 4.0, 4.0)
    )
    train_segmentation(prepared, runs / "baseline", tiny)
    return prepared, runs / "baseline" / "checkpoints" / "best"


class TestTrainSynth:
    """The adversarial loop at tiny scale on phantoms (UNet3D with 4 base channels, 32³ crops)."""

    def config(self, **changes: object) -> object:
        from freetumor_cli.core.train_synth import TrainSynthConfig

        base = {
            "base_channels": 4,
            "roi": (32, 32, 32),
            "max_steps": 4,
            "workers": 0,
            "labelled_repeats": 1,
            "heldout_crops": 8,
            "save_every_steps": 2,
        }
        return TrainSynthConfig(**{**base, **changes})  # type: ignore[arg-type]

    def test_cli_run_folder_and_generator_checkpoint(self, gan_setup: tuple[object, object], tmp_path: object) -> None:
        import json
        from pathlib import Path

        from typer.testing import CliRunner

        from freetumor_cli.app import app

        prepared, baseline = gan_setup
        out = Path(str(tmp_path)) / "synth"
        critic_before = (Path(str(baseline)) / "model.safetensors").read_bytes()
        result = CliRunner().invoke(app, [
            "train-synth", "--data", str(prepared), "--baseline", str(baseline), "--out", str(out), "--max-steps", "3",
            "--workers", "0", "--set", "base_channels=4", "--set", "roi=[32,32,32]", "--set", "labelled_repeats=1",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "held-out QC pass rate" in result.output
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("rules_qc_pass_rate" in r for r in rows) and any(
            "qc_pass_rate" in r and "hu_contrast" in r for r in rows
        )
        assert [r["step"] for r in rows if "loss_g" in r] == [1, 2, 3]
        assert (out / "checkpoints" / "best" / "generator.safetensors").is_file() and list(
            (out / "previews").glob("*.png")
        )
        assert (Path(str(baseline)) / "model.safetensors").read_bytes() == critic_before
        from freetumor_cli.core.checkpoints import load_generator

        loaded = load_generator(out / "checkpoints" / "best")
        assert loaded.meta["generator"]["base_channels"] == 4 and not loaded.module.training
        assert loaded.meta["generator"]["batch_stats"]  # each crop on its own statistics, in training and in use
        assert loaded.meta["organ_channels"] == {"liver": 0, "pancreas": 1, "kidney": 2}  # a 7-class critic
        import yaml

        # config.yaml holds the values in effect: the critic's crop and voxel size, the region's λ.
        written = yaml.safe_load((out / "config.yaml").read_text())
        assert written["spacing_mm"] == [4.0, 4.0, 4.0] and written["roi"] == [32, 32, 32]
        assert written["adversarial_weight"] == 0.1 and None not in (written["roi"], written["spacing_mm"])

    def test_resume_continues_exactly(self, gan_setup: tuple[object, object], tmp_path: object) -> None:
        from pathlib import Path

        from freetumor_cli.core.train_synth import train_generator

        prepared, baseline = gan_setup
        root = Path(str(tmp_path))
        losses: dict[str, list[float]] = {"full": [], "resumed": []}

        def record(name: str):  # type: ignore[no-untyped-def]
            return lambda step, _total, stats: losses[name].append((step, stats["loss_g"], stats["loss_d"]))

        train_generator(prepared, root / "full", self.config(), baseline=baseline, on_step=record("full"))

        class Stop(Exception):
            pass

        def stop_at_two(step: int, _total: int, _stats: dict[str, float]) -> None:
            if step == 2:
                raise Stop

        with pytest.raises(Stop):
            train_generator(prepared, root / "cut", self.config(), baseline=baseline, on_step=stop_at_two)
        train_generator(
            prepared, root / "cut", self.config(), baseline=baseline, resume=True, on_step=record("resumed")
        )
        full = {s: (g, d) for s, g, d in losses["full"]}
        resumed = {s: (g, d) for s, g, d in losses["resumed"]}
        assert sorted(resumed) == [3, 4]
        for step in (3, 4):
            assert resumed[step] == pytest.approx(full[step], rel=1e-5)

    def test_the_critic_must_match_the_region(self, gan_setup: tuple[object, object], tmp_path: object) -> None:
        from pathlib import Path

        from freetumor_cli.core.errors import InputError
        from freetumor_cli.core.train_synth import train_generator

        prepared, baseline = gan_setup
        with pytest.raises(InputError, match="needs a 'covid' baseline"):
            train_generator(prepared, Path(str(tmp_path)) / "x", self.config(region="chest"), baseline=baseline)

    def test_train_seg_uses_the_generator(self, gan_setup: tuple[object, object], tmp_path: object) -> None:
        import json
        from pathlib import Path

        from freetumor_cli.core.errors import ConfigError
        from freetumor_cli.core.train_seg import TrainSegConfig, train_segmentation
        from freetumor_cli.core.train_synth import train_generator

        prepared, baseline = gan_setup
        root = Path(str(tmp_path))
        train_generator(prepared, root / "gen", self.config(max_steps=1), baseline=baseline)
        generator = root / "gen" / "checkpoints" / "best"
        config = TrainSegConfig(
            task="all", mode="freesyn", synth=str(generator), model="unet-tiny", roi=(32, 32, 32), max_steps=2,
            workers=0, spacing_mm=(4.0, 4.0, 4.0), labelled_repeats=1, qc_threshold=0.0,
        )  # fmt: skip
        summary = train_segmentation(prepared, root / "seg", config, baseline=baseline)
        assert summary.steps == 2
        rows = [json.loads(line) for line in (root / "seg" / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("synthetic_tumor_voxels", 0) > 0 for r in rows)
        with pytest.raises((ConfigError, ValueError), match="generator checkpoint"):
            TrainSegConfig(mode="freesyn", synth=str(root / "nowhere"))

    def test_synthesize_with_the_generator_engine(self, gan_setup: tuple[object, object], tmp_path: object) -> None:
        import json
        from pathlib import Path

        import nibabel as nib
        import numpy as np
        from typer.testing import CliRunner

        from freetumor_cli.app import app
        from freetumor_cli.core.phantom import make_phantom
        from freetumor_cli.core.train_synth import train_generator

        from .conftest import oblique_affine

        prepared, baseline = gan_setup
        root = Path(str(tmp_path))
        train_generator(prepared, root / "gen", self.config(max_steps=1), baseline=baseline)
        p = make_phantom((64, 60, 40), (4.0, 4.0, 4.0), seed=7)
        affine = oblique_affine((4.0, 4.0, 4.0))
        nib.save(nib.Nifti1Image(p.ct.array, affine), root / "ct.nii.gz")
        nib.save(nib.Nifti1Image(p.labels.array, affine), root / "lab.nii.gz")
        args = [
            "synthesize",
            "--in",
            str(root / "ct.nii.gz"),
            "--labels",
            str(root / "lab.nii.gz"),
            "--label-scheme",
            "freetumor",
            "--organ",
            "liver",
            "--size",
            "medium",
            "--seed",
            "2",
        ]
        result = CliRunner().invoke(
            app,
            [
                *args,
                "--engine",
                "generator",
                "--generator",
                str(root / "gen" / "checkpoints" / "best"),
                "--out",
                str(root / "g"),
            ],
        )
        assert result.exit_code == 0, result.output
        rules = CliRunner().invoke(app, [*args, "--out", str(root / "r")])
        assert rules.exit_code == 0, rules.output
        g_label = np.asanyarray(nib.load(root / "g" / "ct_liver_synthetic_label.nii.gz").dataobj)
        r_label = np.asanyarray(nib.load(root / "r" / "ct_liver_synthetic_label.nii.gz").dataobj)
        np.testing.assert_array_equal(g_label, r_label)  # same geometry, learned intensities
        g_ct = np.asanyarray(nib.load(root / "g" / "ct_liver_synthetic.nii.gz").dataobj)
        changed = g_ct != p.ct.array
        assert not (changed & (g_label == 0)).any(), "the image changed outside the organ"
        assert (
            nib.load(root / "g" / "ct_liver_synthetic.nii.gz").affine.tolist()
            == nib.load(root / "ct.nii.gz").affine.tolist()
        )
        meta = json.loads((root / "g" / "ct_liver_synthetic.json").read_text())
        assert meta["engine"] == "generator" and len(meta["tumors"]) == 1
        missing = CliRunner().invoke(app, [*args, "--engine", "generator", "--out", str(root / "m")])
        assert missing.exit_code != 0 and "--generator" in missing.output


def test_train_synth_two_processes_through_a_real_launcher(gan_setup: tuple[object, object], tmp_path: object) -> None:
    """Two CPU processes (gloo) started by torchrun run train-synth unchanged."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    prepared, baseline = gan_setup
    out = Path(str(tmp_path)) / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "freetumor_cli", "train-synth", "--data", str(prepared), "--baseline", str(baseline), "--out", str(out),
        "--max-steps", "2", "--workers", "0", "--set", "base_channels=4", "--set", "roi=[32,32,32]", "--set", "labelled_repeats=1",
        "--set", "volumes_per_batch=1",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss_g" in r] == [1, 2]  # written once, by the main process
    assert (out / "checkpoints" / "last" / "generator.safetensors").is_file()
    # The same samples as one process, two per step: step k holds the samples of its steps 2k - 1 and 2k.
    from freetumor_cli.core.train_synth import TrainSynthConfig, train_generator

    single = Path(str(tmp_path)) / "one"
    config = TrainSynthConfig(
        base_channels=4, roi=(32, 32, 32), labelled_repeats=1, max_steps=4, workers=0, volumes_per_batch=1
    )
    train_generator(prepared, single, config, baseline=baseline)  # type: ignore[arg-type]
    one = {
        r["step"]: r["samples"]
        for r in map(json.loads, (single / "metrics.jsonl").read_text().splitlines())
        if "loss_g" in r
    }
    two = {r["step"]: r["samples"] for r in rows if "loss_g" in r}
    assert two == {k: one[2 * k - 1] + one[2 * k] for k in (1, 2)}


def test_a_generator_whose_tumors_are_brighter_than_the_liver_is_named(tmp_path: object) -> None:
    """Abdominal tumors are darker than their organ: a generator that makes them brighter (here one whose
    output is tanh(-5) everywhere) gets a warning for each output, naming the case and the HU."""
    from pathlib import Path

    from typer.testing import CliRunner

    from freetumor_cli.app import app
    from freetumor_cli.core.checkpoints import save_generator
    from freetumor_cli.core.gan import GanConfig, make_generator
    from freetumor_cli.core.io import save_volume
    from freetumor_cli.core.phantom import make_phantom

    root = Path(str(tmp_path))
    gan = GanConfig(base_channels=4)
    generator = make_generator(gan)
    with torch.no_grad():
        generator.out_tr.weight.zero_()
        generator.out_tr.bias.fill_(-5.0)
    save_generator(
        generator, gan, root / "gen", preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(4.0,) * 3), roi=(32,) * 3,
        organ_channels={"liver": 0},
    )  # fmt: skip
    p = make_phantom((64, 60, 40), (4.0, 4.0, 4.0), seed=7)
    save_volume(p.ct.array, p.ct, root / "ct.nii.gz")
    save_volume(p.labels.array, p.ct, root / "lab.nii.gz", label=True)
    result = CliRunner().invoke(
        app,
        [
            "synthesize", "--in", str(root / "ct.nii.gz"), "--labels", str(root / "lab.nii.gz"), "--organ", "liver",
            "--size", "medium", "--generator", str(root / "gen"), "--out", str(root / "o"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "warning: ct: the generator's tumors come out" in output and "HU brighter than their organ" in output


def test_learned_engine_preprocesses_as_the_generator_was_trained(tmp_path: object) -> None:
    """The generator sees in ``synthesize`` what the training chain makes of the same voxels: a crop of its
    own size, centred on the tumor, on its grid."""
    from pathlib import Path

    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose

    from freetumor_cli.core.checkpoints import GeneratorCard
    from freetumor_cli.core.learned import generator_map
    from freetumor_cli.core.phantom import make_phantom
    from freetumor_cli.core.registry import ORGANS
    from freetumor_cli.core.seg_data import read_crop

    from .conftest import oblique_affine

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen = x.clone()
            return torch.ones(x.shape[0], 3, *x.shape[2:])

    p = make_phantom((40, 36, 20), (3.0, 3.0, 4.0), seed=1)
    affine = oblique_affine((3.0, 3.5, 4.0))
    path = Path(str(tmp_path)) / "ct.nii.gz"
    nib.save(nib.Nifti1Image(p.ct.array.astype(np.int16), affine), path)
    image = nib.load(path)
    hu, affine = np.asarray(image.dataobj), image.affine  # as synthesize has them (float32 in the header)
    card = GeneratorCard(
        Preprocessing.for_region("abdomen", spacing_mm=(3.0, 3.0, 3.0)), 2, 0.1, True, roi=(16, 16, 16)
    )
    organ = p.labels.array == ORGANS["liver"].value
    from scipy import ndimage

    # A tumor well inside the liver, in the liver voxel nearest a face of the CT (its crop leaves the CT).
    inner = np.argwhere(ndimage.distance_transform_edt(np.pad(organ, 1))[1:-1, 1:-1, 1:-1] >= 4)
    to_face = np.minimum(inner, np.array(organ.shape) - 1 - inner) * np.array([3.0, 3.0, 4.0])
    deepest = tuple(inner[np.argmin(to_face.min(axis=1))])
    tumor_box = tuple(slice(int(c) - 2, int(c) + 2) for c in deepest)
    recorder = Recorder()
    box, change = generator_map(hu, affine, (tuple(slice(0, n) for n in hu.shape), organ), tumor_box, recorder, card, 0)
    chain = Compose(card.preprocessing.transforms(("image",), crop_foreground=False))
    whole = chain({"image": str(path)})["image"]
    grid = np.asarray(whole.affine)
    center = np.linalg.solve(grid[:3, :3], affine[:3, :3] @ (np.array(deepest) - 0.5) + affine[:3, 3] - grid[:3, 3])
    origin = np.floor(center + 0.5).astype(int) - 8
    leaves = (origin < 0).any() or (origin + 16 > np.asarray(whole.shape[1:])).any()
    assert tuple(recorder.seen.shape) == (1, 1, 16, 16, 16) and leaves  # the crop leaves the CT
    expected = torch.from_numpy(read_crop(whole.as_tensor()[0].numpy(), origin, (16, 16, 16)))  # zeros beyond it
    torch.testing.assert_close(recorder.seen[0, 0], expected, atol=1e-5, rtol=0)
    # The map comes back on the CT's grid around the tumor: tanh(1), kept to the liver, blurred, in HU.
    assert all(b.start <= t.start and t.stop <= b.stop for b, t in zip(box, tumor_box, strict=True))
    inside = change[tuple(slice(t.start - b.start, t.stop - b.start) for t, b in zip(tumor_box, box, strict=True))]
    assert organ[tumor_box].all() and float(np.median(inside)) == pytest.approx(np.tanh(1.0) * 425.0, rel=1e-2)


def test_train_synth_with_a_pancreas_critic(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A single-organ critic other than the liver: every crop reads its organ's channel (a KeyError before)."""
    import json

    from freetumor_cli.core.prepare import PrepareConfig, prepare
    from freetumor_cli.core.train_seg import TrainSegConfig, train_segmentation
    from freetumor_cli.core.train_synth import TrainSynthConfig, train_generator

    from .conftest import write_phantom_root

    root = tmp_path_factory.mktemp("pancreas_root")
    write_phantom_root(root, organ="pancreas", labelled=2, organ_only=2, seed=30, organ_only_seed=40)
    prepared = tmp_path_factory.mktemp("pancreas_prepared")
    prepare(root, prepared, PrepareConfig(folds=2, seed=0))
    runs = tmp_path_factory.mktemp("pancreas_runs")
    critic = TrainSegConfig(
        task="pancreas", model="unet-tiny", roi=(32, 32, 32), max_steps=1, workers=0, spacing_mm=(4.0, 4.0, 4.0),
        val_every=10**6,
    )  # fmt: skip
    train_segmentation(prepared, runs / "critic", critic)
    config = TrainSynthConfig(base_channels=4, max_steps=2, workers=0, labelled_repeats=1, heldout_crops=4)
    summary = train_generator(prepared, runs / "gen", config, baseline=runs / "critic" / "checkpoints" / "last")
    assert summary.steps == 2
    rows = [json.loads(line) for line in (runs / "gen" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss_g" in r] == [1, 2]
    meta = json.loads((runs / "gen" / "checkpoints" / "last" / "generator.json").read_text())
    assert meta["roi"] == [32, 32, 32] and meta["spacing_mm"] == [4.0, 4.0, 4.0]  # the critic's crop and grid
