"""A generator runs on the context it was trained on: per crop, kept to the organ, clamped to the window,
checked against the run, and the same in use as in training.

The released generator is stood in for by ``TGAN.pt``-shaped networks (the Models-Genesis UNet3D with the
authors' batch norm, random weights, fewer base channels to stay small).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from freetumor_cli.core.errors import ConfigError  # noqa: E402
from freetumor_cli.core.gan import GanConfig, intensity_map, make_generator, organ_voxels  # noqa: E402
from freetumor_cli.core.preprocess import Preprocessing  # noqa: E402
from freetumor_cli.core.registry import ORGANS, REGIONS  # noqa: E402


def released_like(seed: int = 0, *, base: int = 4, region: str = "abdomen") -> torch.nn.Module:
    """A generator as ``import_tgan`` builds the released one: batch statistics, eval mode, random weights."""
    torch.manual_seed(seed)
    return make_generator(GanConfig(region=region, base_channels=base, batch_stats=True)).eval()


def crops(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` crops of different content: two organ-like, the others air- or bone-like (train-seg's negatives)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, size, generator=gen) * 0.2
    x[0] += 0.6
    x[1, :, 4:12, 4:12, 4:12] += 0.7
    if n > 3:
        x[3] = 1.0 - x[3]
    return x


# Item 2: per crop ------------------------------------------------------------------------------------


def test_a_crops_map_is_the_same_alone_and_in_a_batch() -> None:
    generator = released_like()
    x = crops()
    mask = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        together = intensity_map(generator(x), [0] * 4, "abdomen", mask)
        for b in range(4):
            alone = intensity_map(generator(x[b : b + 1]), [0], "abdomen", mask[b : b + 1])
            torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=0)
        # Alone, a crop is normalised as the authors' ContBatchNorm3d normalises a batch of one.
        shuffled = generator(x[[2, 0, 3, 1]])
        torch.testing.assert_close(shuffled[1], generator(x)[0], atol=1e-5, rtol=0)


def test_the_released_norm_on_one_crop_is_batch_norm_with_its_statistics() -> None:
    from freetumor_cli.core.gan import CropStatsNorm3d

    norm = CropStatsNorm3d(3).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    x = torch.randn(2, 3, 5, 6, 7) * torch.tensor([1.0, 3.0, 0.2]).reshape(1, 3, 1, 1, 1)
    for b in range(2):
        one = x[b : b + 1]
        expected = torch.nn.functional.batch_norm(one, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
        torch.testing.assert_close(norm(x)[b : b + 1], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(norm.running_mean, torch.zeros(3)) and torch.equal(norm.running_var, torch.ones(3))


def test_train_seg_runs_the_generator_per_crop() -> None:
    """``learned_intensity`` on a batch gives each crop the image it gets alone."""
    from freetumor_cli.core.seg_data import SegBatch, learned_intensity

    generator = released_like()
    x = crops()
    label = torch.zeros_like(x)
    label[:2, :, 2:14, 2:14, 2:14] = 1  # liver in the first two crops, none in the negatives
    synth = torch.zeros_like(x, dtype=torch.bool)
    synth[:2, :, 6:10, 6:10, 6:10] = True
    label[synth] = 2
    profile = synth.float() * 0.8
    batch = SegBatch(image=x, label=label, synth_mask=synth, image_orig=x, profile=profile,
                     organ_index=torch.zeros(4, dtype=torch.long))  # fmt: skip
    together = learned_intensity(batch, generator, "liver", {"liver": 0}).image
    for b in range(4):
        part = SegBatch(image=x[b : b + 1], label=label[b : b + 1], synth_mask=synth[b : b + 1],
                        image_orig=x[b : b + 1], profile=profile[b : b + 1], organ_index=torch.zeros(1, dtype=torch.long))  # fmt: skip
        torch.testing.assert_close(together[b : b + 1], learned_intensity(part, generator, "liver", {"liver": 0}).image)
    assert not torch.equal(together[:2], x[:2]) and torch.equal(together[2:], x[2:])


def test_synthesize_gives_the_map_the_training_path_gives(tmp_path: Path) -> None:
    """A CT already on the generator's grid: the map ``synthesize`` computes around a tumor is the map
    the training path computes for the training crop centred on it."""
    from freetumor_cli.core.checkpoints import GeneratorCard
    from freetumor_cli.core.learned import generator_map
    from freetumor_cli.core.phantom import make_phantom
    from freetumor_cli.core.seg_data import read_crop

    p = make_phantom((48, 44, 40), (3.0, 3.0, 3.0), seed=2)
    hu, affine = p.ct.array.astype(np.float32), p.ct.affine
    organ = p.labels.array == ORGANS["liver"].value
    card = GeneratorCard(
        Preprocessing.for_region("abdomen", spacing_mm=(3.0, 3.0, 3.0)), 2, 0.1, True, roi=(16, 16, 16)
    )
    generator = released_like(3)
    center = np.argwhere(organ).mean(axis=0).round().astype(int)
    tumor_box = tuple(slice(int(c) - 3, int(c) + 4) for c in center)  # centre voxel c
    box, hu_map = generator_map(
        hu, affine, (tuple(slice(0, n) for n in hu.shape), organ), tumor_box, generator, card, 0
    )
    # The training path: the windowed CT's crop at the same place, its organ, one forward.
    origin = center - 8
    windowed = np.clip((hu - -175.0) / 425.0, 0, 1)
    x = torch.from_numpy(read_crop(windowed, origin, (16, 16, 16)))[None, None]
    mask = torch.from_numpy(read_crop(organ, origin, (16, 16, 16)))[None, None]
    with torch.no_grad():
        expected = intensity_map(generator(x), [0], "abdomen", mask)[0, 0].numpy() * 425.0
    got = hu_map[tuple(slice(o - b.start, o + 16 - b.start) for o, b in zip(origin, box, strict=True))]
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert float(np.abs(expected).max()) > 10.0  # a map, not zeros


# Item 3: a generator is checked like a baseline --------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("spacing_mm", [3.0, 3.0, 3.0], "--set spacing_mm=[3.0, 3.0, 3.0]"),
        ("window_hu", [-100.0, 200.0], "train the generator with the abdomen's window"),
        ("roi", [64, 64, 64], "--set roi=[64, 64, 64]"),
    ],
)
def test_a_generator_trained_otherwise_is_refused(key: str, value: list[float], hint: str) -> None:
    from freetumor_cli.core.checkpoints import GeneratorCard
    from freetumor_cli.core.train_seg import TrainSegConfig, check_generator, model_config_for

    run = model_config_for(TrainSegConfig(task="liver", model="unet").resolved())
    gan = {"region": "abdomen", "base_channels": 32, "adversarial_weight": 0.1}
    meta = {"generator": gan, "spacing_mm": [1.5] * 3, "window_hu": [-175.0, 250.0], "roi": [96] * 3}
    check_generator(GeneratorCard.from_json(meta), run, "gen")  # the same: accepted
    with pytest.raises(ConfigError, match=rf"the generator gen was trained with {key} \(") as caught:
        check_generator(GeneratorCard.from_json({**meta, key: value}), run, "gen")
    assert hint in (caught.value.hint or "")
    with pytest.raises(ConfigError, match="region chest, this run uses abdomen"):
        check_generator(GeneratorCard.from_json({**meta, "generator": {**gan, "region": "chest"}}), run, "gen")


def test_train_seg_refuses_a_generator_of_another_spacing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from freetumor_cli.app import app
    from freetumor_cli.core.checkpoints import save_generator

    from .conftest import flat, write_phantom_root

    gan = GanConfig(base_channels=2)
    generator = save_generator(
        make_generator(gan), gan, tmp_path / "gen", preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(3.0,) * 3), roi=(32,) * 3,
        organ_channels={"liver": 0},
    )  # fmt: skip
    from freetumor_cli.core.prepare import PrepareConfig, prepare

    root = write_phantom_root(tmp_path / "root", labelled=1, organ_only=1)
    prepare(root, tmp_path / "prepared", PrepareConfig(folds=2, store=False))
    result = CliRunner().invoke(app, [
        "train-seg", "--data", str(tmp_path / "prepared"), "--organ", "liver", "--task", "freesyn", "--synth",
        str(generator), "--model", "unet-tiny", "--set", "roi=[32,32,32]", "--set", "spacing_mm=[4.0,4.0,4.0]",
        "--workers", "0", "--max-steps", "1", "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    text = flat(result.output)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "the generator" in text and "spacing_mm (3.0, 3.0, 3.0), this run uses (4.0, 4.0, 4.0)" in text, text


# Item 4: clamped to the window ---------------------------------------------------------------------------


def saturated_generator(folder: Path, *, spacing: float = 4.0) -> Path:
    """A generator whose map is 1 everywhere (tanh of a large constant): the strongest change it can make."""
    from freetumor_cli.core.checkpoints import save_generator

    gan = GanConfig(base_channels=2, batch_stats=True)
    module = make_generator(gan)
    with torch.no_grad():
        module.out_tr.weight.zero_()
        module.out_tr.bias.fill_(20.0)
    return save_generator(
        module, gan, folder, preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(spacing,) * 3), roi=(32,) * 3,
        organ_channels={"liver": 0, "pancreas": 0, "kidney": 0},
    )  # fmt: skip


def test_a_saturated_map_takes_the_liver_to_the_window_and_no_further(tmp_path: Path) -> None:
    from freetumor_cli.core.phantom import make_phantom
    from freetumor_cli.core.synthesize import synthesize_tumors

    p = make_phantom((64, 60, 40), (4.0, 4.0, 4.0), seed=5)
    generator = saturated_generator(tmp_path / "gen")
    out = synthesize_tumors(
        p.ct.array,
        p.labels.array,
        "liver",
        affine=p.ct.affine,
        seed=1,
        size="medium",
        generator=generator,
        label_scheme="freetumor",
    )
    tumor = out.label == ORGANS["liver"].tumor_value
    changed = out.image != p.ct.array
    low = REGIONS["abdomen"].window_hu[0]
    assert tumor.any() and changed.any()
    assert out.image[changed].min() >= low - 1, "the generator took the liver below the window"
    # Its darkest voxels come near the window's edge (the blurred mask and the texture scale the map below 1).
    assert out.image[tumor].min() <= low + 0.1 * (REGIONS["abdomen"].window_hu[1] - low)
    assert out.tumors[0].mean_hu_change < 0


def test_clamp_to_window_is_the_training_compose() -> None:
    from freetumor_cli.core.gan import compose
    from freetumor_cli.core.learned import clamp_to_window

    rng = np.random.default_rng(0)
    hu = rng.uniform(-400, 500, 1000).astype(np.float32)
    change = rng.uniform(-500, 100, 1000).astype(np.float32)
    delta = clamp_to_window(hu, change, (-175.0, 250.0))
    windowed = torch.from_numpy(np.clip((hu + 175) / 425, 0, 1))
    trained = compose(windowed, torch.ones_like(windowed), torch.from_numpy(change / 425), 1.0).numpy()
    np.testing.assert_allclose(np.clip(hu, -175, 250) + delta, trained * 425 - 175, atol=1e-3)


# Item 5: freetumor's own generator does in use what it did in training ----------------------------------


def test_a_new_generator_normalises_each_crop_in_training_and_in_use() -> None:
    torch.manual_seed(1)
    generator = make_generator(GanConfig(base_channels=4))
    x = crops()
    generator.train()
    with torch.no_grad():
        in_training = generator(x)
    generator.eval()
    with torch.no_grad():
        in_use = generator(x)
        alone = torch.cat([generator(x[b : b + 1]) for b in range(4)])
    torch.testing.assert_close(in_use, in_training)
    torch.testing.assert_close(alone, in_training, atol=1e-5, rtol=0)


# Item 6: the map is kept to the organ before its blur ----------------------------------------------------


@pytest.mark.parametrize("region", ["abdomen", "chest"])
def test_the_map_fades_at_the_organ_edge_as_in_the_original(region: str) -> None:
    output = torch.full((1, 1, 24, 8, 8), 3.0)
    organ = torch.zeros(1, 1, 24, 8, 8, dtype=torch.bool)
    organ[:, :, :12] = True
    change = intensity_map(output, [0], region, organ)[0, 0, :, 4, 4]
    full = float(torch.tanh(torch.tensor(3.0)) if region == "abdomen" else torch.sigmoid(torch.tensor(3.0)))
    if REGIONS[region].generator_map_in_organ:  # the original's abdomen
        assert float(change[5]) == pytest.approx(full, rel=1e-4)
        assert 0.3 * full < float(change[11]) < 0.7 * full  # fades at the edge
        assert float(change[18]) == pytest.approx(0.0, abs=1e-6)
    else:  # the original's chest blurs the whole map
        assert float(change[11]) == pytest.approx(full, rel=1e-4) and float(change[18]) == pytest.approx(full, rel=1e-4)


def test_organ_voxels_are_the_organ_before_synthesis() -> None:
    labels = torch.tensor([0, 1, 2, 2, 3, 1]).reshape(1, 1, 6, 1, 1).float()
    synth = torch.tensor([0, 0, 1, 0, 0, 0]).reshape(1, 1, 6, 1, 1).bool()
    got = organ_voxels(labels, synth, [1])[0, 0, :, 0, 0].tolist()
    assert got == [False, True, True, False, False, True]  # the real tumor (2, not synthetic) is not organ


def test_a_generator_json_of_the_first_versions_still_loads(tmp_path: Path) -> None:
    """The first generator.json: no ``batch_stats`` (it keeps BatchNorm3d), no ``organ_channels`` (the
    generalist's channels)."""
    import json

    from freetumor_cli.core.checkpoints import GeneratorCard, load_generator, save_generator

    gan = GanConfig(base_channels=2, batch_stats=False)
    folder = save_generator(
        make_generator(gan), gan, tmp_path / "first", preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(1.5,) * 3), roi=(96,) * 3,
        organ_channels={"liver": 0},
    )  # fmt: skip
    first = {
        "generator": {"region": "abdomen", "base_channels": 2, "adversarial_weight": 0.1},
        "spacing_mm": [1.5, 1.5, 1.5], "window_hu": [-175, 250], "roi": [96, 96, 96], "version": "0.1.0",
        "critic": "runs/baseline/checkpoints/best",
    }  # fmt: skip
    (folder / "generator.json").write_text(json.dumps(first))
    loaded = load_generator(folder)
    assert loaded.card == GeneratorCard(
        Preprocessing.for_region("abdomen", spacing_mm=(1.5, 1.5, 1.5)), 2, 0.1, False, (96, 96, 96), {},
        {"version": "0.1.0", "critic": "runs/baseline/checkpoints/best"},
    )  # fmt: skip
    assert type(loaded.module.down_tr64.ops[0].bn1) is torch.nn.BatchNorm3d
    assert loaded.channel("kidney") == 2 and loaded.card.preprocessing.spacing_mm == (1.5, 1.5, 1.5)
    assert loaded.meta["generator"]["batch_stats"] is False and loaded.meta["critic"] == first["critic"]


def test_a_generator_card_keeps_its_preprocessing(tmp_path: Path) -> None:
    """The card's whole preprocessing survives generator.json (orientation included), and a generator
    trained in another orientation is refused by a run that does not share it."""
    from freetumor_cli.core.checkpoints import load_generator, save_generator
    from freetumor_cli.core.train_seg import TrainSegConfig, check_generator, model_config_for

    gan = GanConfig(base_channels=2)
    for orientation in ("RAS", "LPS"):
        preprocessing = Preprocessing.for_region("abdomen", spacing_mm=(1.5,) * 3, orientation=orientation)
        folder = save_generator(
            make_generator(gan), gan, tmp_path / orientation, preprocessing=preprocessing, roi=(96,) * 3,
            organ_channels={"liver": 0},
        )  # fmt: skip
        card = load_generator(folder).card
        assert card.preprocessing == preprocessing and card.region == "abdomen"
    run = model_config_for(TrainSegConfig(task="liver", model="unet", roi=(96,) * 3, spacing_mm=(1.5,) * 3).resolved())
    check_generator(load_generator(tmp_path / "RAS").card, run, "RAS")
    with pytest.raises(ConfigError, match="orientation"):
        check_generator(load_generator(tmp_path / "LPS").card, run, "LPS")
