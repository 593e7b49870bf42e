"""The authors' released weights: their key layouts, safe loading, the generator's facts, fetch-weights.

State dicts are built here in the authors' layouts from MONAI's SwinUNETR (feature size 12, to stay small)
and the Models-Genesis UNet3D; no released weights are shipped.
"""

from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from typer.testing import CliRunner  # noqa: E402

from freetumor_cli.app import app  # noqa: E402
from freetumor_cli.core.checkpoints import (  # noqa: E402
    convert_released,
    import_segmentor,
    import_tgan,
    initialize_from,
    load_checkpoint,
    load_generator,
)
from freetumor_cli.core.errors import InputError  # noqa: E402
from freetumor_cli.core.gan import GanConfig, make_discriminator, make_generator  # noqa: E402
from freetumor_cli.core.preprocess import Preprocessing  # noqa: E402

from .conftest import flat  # noqa: E402
from .hub_server import fail_writes_under, serve_hub, silent_hub  # noqa: E402


def swinunetr(out_channels: int) -> torch.nn.Module:
    """The authors' SwinUNETR as their ``TumorGAN.py`` builds it (feature size 12 instead of 48, to stay small)."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(out_channels)
    return SwinUNETR(
        in_channels=1, out_channels=out_channels, feature_size=12, drop_rate=0.0, attn_drop_rate=0.0,
        dropout_path_rate=0.0, use_checkpoint=True, use_v2=True,
    ).eval()  # fmt: skip


def authors_checkpoint(model: torch.nn.Module, path: Path, epoch: int = 99) -> Path:
    """Saved as their ``Free_trainer.save_checkpoint`` saves the best model: epoch, best accuracy, weights,
    optimizer and scheduler states."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    torch.save(
        {"epoch": epoch, "best_acc": 0.61, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
         "scheduler": scheduler.state_dict()},
        path,
    )  # fmt: skip
    return path


def authors_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """As the authors' DDP runs saved them: ``module.`` prefixes and the old ``swin_vit`` name."""
    return {f"module.{k}".replace("swinViT.", "swin_vit."): v for k, v in state.items()}


def released_unet(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}".replace("out_tr.", "out_tr.final_conv."): v for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("released")
    baseline, covid = swinunetr(7), swinunetr(2)  # the chest's: background, lesion (FreeTumor-Chest)
    torch.save(
        {"epoch": 99, "best_acc": 0.6, "state_dict": authors_names(baseline.state_dict())},
        root / "model_baseline_segmentor.pt",
    )
    authors_checkpoint(covid, root / "model_covid_voco160k.pt")
    gan = GanConfig(base_channels=2)
    tgan = {**released_unet(make_generator(gan), "netG"), **released_unet(make_discriminator(gan), "netD")}
    tgan.update({f"netSeg.{k}": v for k, v in baseline.state_dict().items()})
    torch.save({"epoch": 100, "state_dict": tgan}, root / "TGAN.pt")
    encoder = {f"backbone.{k}": v for k, v in baseline.state_dict().items() if k.startswith(("swinViT.", "encoder"))}
    torch.save(encoder, root / "VoCo_B_SSL_head.pt")
    torch.save({"generator": make_generator(gan).state_dict()}, root / "reference.pt")
    return {"baseline": root / "model_baseline_segmentor.pt", "covid": root / "model_covid_voco160k.pt",
            "tgan": root / "TGAN.pt", "voco": root / "VoCo_B_SSL_head.pt", "root": root}  # fmt: skip


def test_the_authors_baselines_load_with_their_names(released: dict[str, Path]) -> None:
    model, config, _ = load_checkpoint(released["baseline"])
    assert (config.task, config.out_channels, config.feature_size, config.roi) == ("all", 7, 12, (96, 96, 96))
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), swinunetr(7)(x))
    _, chest = import_segmentor(released["covid"])
    assert (chest.task, chest.region, chest.preprocessing.spacing_mm, chest.roi, chest.out_channels) == (
        "covid",
        "chest",
        (1.25, 1.25, 5.0),
        (192, 192, 32),
        2,
    )


def test_a_key_that_does_not_fit_is_named(released: dict[str, Path], tmp_path: Path) -> None:
    state = torch.load(released["baseline"], weights_only=True)["state_dict"]
    renamed = {
        ("module.decoder1.oops.weight" if k == "module.decoder1.conv_block.conv1.conv.weight" else k): v
        for k, v in state.items()
    }
    torch.save({"state_dict": renamed}, tmp_path / "renamed.pt")
    with pytest.raises(InputError, match=r"lacks the key 'decoder1\.conv_block\.conv1\.conv\.weight'"):
        load_checkpoint(tmp_path / "renamed.pt")
    torch.save({"state_dict": {**state, "module.extra.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(InputError, match=r"holds the key 'extra\.weight'"):
        load_checkpoint(tmp_path / "extra.pt")


def test_a_pickle_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (marker.write_text, ("the payload ran",))

    torch.save({"state_dict": {"netG.x": Payload()}}, tmp_path / "evil.pt")
    for load in (load_checkpoint, load_generator, lambda p: initialize_from(torch.nn.Linear(1, 1), p)):
        with pytest.raises(InputError, match="safely"):
            load(tmp_path / "evil.pt")
    assert not marker.exists()
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "evil.pt"), "--data", str(tmp_path)])
    assert result.exit_code != 0 and "Traceback" not in result.output and not marker.exists()


def test_the_released_generator_uses_channel_0_and_batch_statistics(released: dict[str, Path]) -> None:
    gen = import_tgan(released["tgan"])
    assert gen.meta["generator"]["batch_stats"] and gen.meta["released"]
    assert [gen.channel(o) for o in ("liver", "pancreas", "kidney")] == [0, 0, 0]
    assert gen.discriminator_state is not None and gen.critic is not None and gen.critic[1].task == "all"
    x = torch.rand(2, 1, 16, 16, 16)
    running = make_generator(GanConfig(base_channels=2, batch_stats=False)).eval()
    running.load_state_dict(gen.module.state_dict())
    with torch.no_grad():  # each crop on its own statistics at inference (not the running ones), as run alone
        torch.testing.assert_close(gen.module(x)[:1], gen.module(x[:1]), atol=1e-5, rtol=0)
        assert not torch.allclose(gen.module(x), running(x), atol=1e-3)
    state = torch.load(released["tgan"], weights_only=True)["state_dict"]
    assert all(
        torch.equal(v, state["netG." + k.replace("out_tr.", "out_tr.final_conv.")])
        for k, v in gen.module.state_dict().items()
    )


def test_an_untrained_channel_is_refused(released: dict[str, Path], tmp_path: Path) -> None:
    from freetumor_cli.core.checkpoints import save_generator

    gan = GanConfig(base_channels=2)
    folder = save_generator(
        make_generator(gan), gan, tmp_path / "liver_only", preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(1.5,) * 3), roi=(96,) * 3,
        organ_channels={"liver": 0},
    )  # fmt: skip
    loaded = load_generator(folder)
    assert loaded.channel("liver") == 0
    with pytest.raises(InputError, match="trained for liver tumors, not pancreas"):
        loaded.channel("pancreas")


def test_conversion_once_into_freetumor_folders(released: dict[str, Path], tmp_path: Path) -> None:
    folder = convert_released(released["tgan"], tmp_path / "tgan")
    assert {p.name for p in folder.iterdir()} >= {
        "generator.safetensors",
        "discriminator.safetensors",
        "generator.json",
        "critic",
    }
    again = load_generator(folder)
    direct = import_tgan(released["tgan"])
    assert again.meta["organ_channels"] == direct.meta["organ_channels"] and again.meta["generator"]["batch_stats"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.module.state_dict().values(), direct.module.state_dict().values(), strict=True)
    )
    assert again.critic is not None and again.critic[1].task == "all"
    seg = convert_released(released["covid"], tmp_path / "covid")
    _, config, _ = load_checkpoint(seg)
    assert config.task == "covid" and config.labels == {"0": "background", "1": "lesion"}


def test_the_chest_baseline_predicts_background_and_lesion(released: dict[str, Path], tmp_path: Path) -> None:
    """``model_covid_voco160k.pt`` has 2 outputs; quality control, the critic and evaluate read channel 1."""
    from freetumor_cli.core.predict import channels_to_region
    from freetumor_cli.core.registry import REGIONS

    folder = convert_released(released["covid"], tmp_path / "covid")
    model, config, _ = load_checkpoint(folder)
    assert (config.out_channels, config.class_names(), config.region_class_names) == (
        2, {0: "background", 1: "lesion"}, ("lesion",),
    )  # fmt: skip
    assert config.tumor_channel("lung") == 1 and config.region_values() == {0: 0, 1: 2}
    lut = channels_to_region(config)
    assert REGIONS["chest"].labels[int(lut[1])] == "lesion" and int(lut[0]) == 0
    x = torch.rand(1, 1, 64, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), swinunetr(2)(x))
    # The class count decides: three outputs are freetumor's covid task, four fit nothing.
    authors_checkpoint(swinunetr(3), tmp_path / "covid_3class.pt")
    _, three = import_segmentor(tmp_path / "covid_3class.pt")
    assert three.class_names() == {0: "background", 1: "lung", 2: "lesion"} and three.tumor_channel("lung") == 2
    authors_checkpoint(swinunetr(4), tmp_path / "covid_4class.pt")
    with pytest.raises(
        InputError, match=r"predicts 4 classes; a covid network predicts 3 .* or 2 \(background, lesion\)"
    ):
        import_segmentor(tmp_path / "covid_4class.pt")
    from freetumor_cli.core.errors import ConfigError

    with pytest.raises(ConfigError, match="does not segment liver tumors"):
        config.tumor_channel("liver")


def test_quality_control_and_the_critic_read_the_lesion_channel(released: dict[str, Path]) -> None:
    from freetumor_cli.core.seg_data import SegBatch, quality_controlled
    from freetumor_cli.core.train_seg import TrainSegConfig, check_quality_control_baseline, model_config_for
    from freetumor_cli.core.train_synth import gan_batch

    _, config = import_segmentor(released["covid"])
    run = model_config_for(TrainSegConfig(task="covid", model="unet").resolved())
    channels = check_quality_control_baseline(config, run, "covid-baseline")
    assert channels == {"lung": 1}

    class LesionWhereBright(torch.nn.Module):
        """A 2-class stand-in: lesion where the crop is bright."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x), 10 * (x - 0.5)], 1)

    image = torch.zeros(2, 1, 8, 8, 8)
    label = torch.ones_like(image)  # lung
    synth = torch.zeros_like(image, dtype=torch.bool)
    synth[:, :, 2:5, 2:5, 2:5] = True
    label[synth] = 2
    bright = image.clone()
    bright[0][synth[0]] = 1.0  # crop 0's lesion is bright, crop 1's is not
    batch = SegBatch(
        image=bright, label=label, synth_mask=synth, image_orig=image, label_orig=torch.ones_like(image),
        organ_index=torch.zeros(2, dtype=torch.long),
    )  # fmt: skip
    kept, stats = quality_controlled(batch, LesionWhereBright(), channels, "covid", 0.7, contextlib.nullcontext)
    assert (stats.seen, stats.kept) == (2, 1)
    assert torch.equal(kept.image[0], bright[0]) and torch.equal(kept.image[1], image[1])
    assert int(kept.label[1].max()) == 1  # the rejected lesion is lung again
    assert torch.equal(kept.label[1], torch.ones_like(image[1])) and torch.equal(kept.label[0], label[0])
    raw = {
        "image": image,
        "label": label,
        "synth_mask": synth,
        "profile": synth.float(),
        "organ_index": torch.zeros(2, 1),
    }
    assert gan_batch(raw, config, "covid", {"lung": 0}).seg_tumor_channels == [1, 1]


def test_evaluate_writes_and_scores_the_lesion_of_a_two_class_network(tmp_path: Path) -> None:
    """A network of background and lesion writes 0 and 2 (lesion) in the chest space, and only the lesion is scored."""
    import json

    import numpy as np

    from freetumor_cli.core.checkpoints import save_checkpoint
    from freetumor_cli.core.io import Volume, save_volume
    from freetumor_cli.core.models import ModelConfig, build_model

    config = ModelConfig(
        name="unet-tiny", out_channels=2, roi=(32, 32, 16), task="covid",
        preprocessing=Preprocessing.for_region("chest", spacing_mm=(4.0, 4.0, 4.0), window_hu=(-1000.0, 500.0)),
        labels={"0": "background", "1": "lesion"},
    )  # fmt: skip
    model = build_model(config)
    with torch.no_grad():
        final = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)][-1]
        final.bias.copy_(torch.tensor([0.0, 50.0]))  # lesion wherever it looks
    save_checkpoint(model, config, tmp_path / "net")
    ct = np.full((20, 20, 10), -800, np.int16)
    ct[4:16, 4:16, 2:8] = 40
    truth = np.zeros(ct.shape, np.uint8)
    truth[2:18, 2:18, 1:9] = 1
    truth[6:10, 6:10, 3:6] = 2
    reference = Volume(ct, np.diag([4.0, 4.0, 4.0, 1.0]))
    save_volume(ct, reference, tmp_path / "data" / "imagesTr" / "case_0000.nii.gz")
    save_volume(truth, reference, tmp_path / "data" / "labelsTr" / "case.nii.gz", label=True)
    images = tmp_path / "data" / "imagesTr"
    (tmp_path / "list.json").write_text(json.dumps({"testing": [
        {"image": str(images / "case_0000.nii.gz"), "label": str(tmp_path / "data" / "labelsTr" / "case.nii.gz")}
    ]}))  # fmt: skip
    result = CliRunner().invoke(app, [
        "evaluate", "--checkpoint", str(tmp_path / "net"), "--data", str(tmp_path / "list.json"), "--out", str(tmp_path / "ev"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    from freetumor_cli.core.io import load_volume

    predicted = load_volume(tmp_path / "ev" / "predictions" / "case.nii.gz").array
    assert 2 in predicted and set(np.unique(predicted).tolist()) <= {0, 2}  # lesion (2), never lung (1)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert "lesion" in json.dumps(summary) and "lung" not in json.dumps(summary), summary
    assert json.loads((tmp_path / "ev" / "predictions" / "prediction.json").read_text())["classes"] == ["lesion"]


def test_the_chest_tgan_file_loads_with_its_two_class_netseg(tmp_path: Path) -> None:
    """FreeTumor-Chest's TGAN: a 1-output sigmoid generator and a 2-output netSeg."""
    gan = GanConfig(region="chest", base_channels=2)
    state = {**released_unet(make_generator(gan), "netG"), **released_unet(make_discriminator(gan), "netD")}
    state.update({f"netSeg.{k}": v for k, v in swinunetr(2).state_dict().items()})
    torch.save({"epoch": 50, "state_dict": state}, tmp_path / "TGAN_covid.pt")
    gen = import_tgan(tmp_path / "TGAN_covid.pt")
    assert gen.region == "chest" and gen.channel("lung") == 0 and gen.critic is not None
    assert gen.critic[1].class_names() == {0: "background", 1: "lesion"} and gen.critic[1].tumor_channel("lung") == 1


def test_voco_weights_initialise_the_encoder(released: dict[str, Path]) -> None:
    model = swinunetr(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialize_from(model, released["voco"])
    encoder = [k for k in before if k.startswith(("swinViT.", "encoder"))]
    assert sorted(report.loaded) == sorted(encoder) and report.missing and not report.unused
    assert all(
        torch.equal(model.state_dict()[k], torch.load(released["voco"], weights_only=True)["backbone." + k])
        for k in encoder
    )
    assert torch.equal(
        model.state_dict()["out.conv.conv.weight"], before["out.conv.conv.weight"]
    )  # no decoder in the file
    with pytest.raises(InputError, match="no tensor matches"):
        initialize_from(torch.nn.Linear(3, 3), released["voco"])


@pytest.fixture
def isolated_hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def test_fetch_weights_downloads_converts_resumes_and_works_offline(
    released: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_hub_home: None
) -> None:
    files = {
        "baseline/model_baseline_segmentor.pt": released["baseline"].read_bytes(),
        "baseline/model_covid_voco160k.pt": released["covid"].read_bytes(),
        "baseline/TGAN.pt": released["tgan"].read_bytes(),
        "pretrained/VoCo_B_SSL_head.pt": released["voco"].read_bytes(),
    }
    home = tmp_path / "home"
    monkeypatch.setenv("FREETUMOR_HOME", str(home))
    run = CliRunner()
    with serve_hub({}, models={"Luffy503/FreeTumor": files}) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = run.invoke(app, ["fetch-weights"])
        assert result.exit_code == 0, result.output
        text = flat(result.output)
        assert f"baseline: {home / 'checkpoints' / 'baseline'} (downloaded)" in text
        assert (home / "checkpoints" / "tgan" / "critic" / "model.json").is_file()
        log.clear()
        again = run.invoke(app, ["fetch-weights"])
        assert again.exit_code == 0 and "(up to date)" in again.output, again.output
        assert not [r for r in log if "/resolve/" in r[1]], "a second run must not download"
        (home / "downloads" / "Luffy503/FreeTumor" / "baseline" / "TGAN.pt").unlink()  # an interrupted cache
        log.clear()
        resumed = run.invoke(app, ["fetch-weights", "tgan", "baseline"])
        assert resumed.exit_code == 0, resumed.output
        assert sorted({p.rsplit("/", 1)[-1] for m, p in log if m == "GET" and "/resolve/" in p}) == ["TGAN.pt"]
        missing = run.invoke(app, ["fetch-weights", "nope"])
        assert missing.exit_code == 2 and "unknown released file 'nope'" in flat(missing.output)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = run.invoke(app, ["fetch-weights", "baseline"])
    assert offline.exit_code == 0 and "offline" in offline.output, offline.output
    empty = run.invoke(app, ["fetch-weights", "--home", str(tmp_path / "empty")])
    assert empty.exit_code != 0 and "lacks baseline" in flat(empty.output) and "Traceback" not in empty.output
    _, config, _ = load_checkpoint(home / "checkpoints" / "baseline")
    assert config.task == "all" and config.feature_size == 12
    _, chest, _ = load_checkpoint(home / "checkpoints" / "covid-baseline")
    assert chest.class_names() == {0: "background", 1: "lesion"} and chest.tumor_channel("lung") == 1


def released_files(released: dict[str, Path]) -> dict[str, bytes]:
    return {
        "baseline/model_baseline_segmentor.pt": released["baseline"].read_bytes(),
        "baseline/model_covid_voco160k.pt": released["covid"].read_bytes(),
        "baseline/TGAN.pt": released["tgan"].read_bytes(),
        "pretrained/VoCo_B_SSL_head.pt": released["voco"].read_bytes(),
    }


def test_fetch_weights_fetches_or_converts_a_damaged_cache_again(
    released: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_hub_home: None
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("FREETUMOR_HOME", str(home))
    run = CliRunner()
    converted = home / "checkpoints" / "baseline" / "model.safetensors"
    download = home / "downloads" / "Luffy503/FreeTumor" / "baseline" / "model_baseline_segmentor.pt"
    with serve_hub({}, models={"Luffy503/FreeTumor": released_files(released)}) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert run.invoke(app, ["fetch-weights", "baseline"]).exit_code == 0
        intact = converted.read_bytes()
        converted.write_bytes(intact[: len(intact) // 2])  # a converted file cut short
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        offline = run.invoke(app, ["fetch-weights", "baseline"])
        assert offline.exit_code == 4 and "baseline is damaged" in flat(offline.output), offline.output
        monkeypatch.delenv("HF_HUB_OFFLINE")
        log.clear()
        again = run.invoke(app, ["fetch-weights", "baseline"])
        assert again.exit_code == 0 and "(converted)" in again.output, again.output
        assert not [r for r in log if "/resolve/" in r[1]], "the intact download is converted again, not fetched"
        assert converted.read_bytes() == intact
        data = download.read_bytes()
        download.write_bytes(data[:-1000] + bytes(1000))  # a download damaged in place: same size, other bytes
        again = run.invoke(app, ["fetch-weights", "baseline"])
        assert again.exit_code == 0 and "(downloaded)" in again.output, again.output
        assert download.read_bytes() == data
    assert not list(home.rglob("*.part")) and not list(home.rglob("*.converting"))
    _, config, _ = load_checkpoint(home / "checkpoints" / "baseline")
    assert config.task == "all"


def test_fetch_weights_into_an_unwritable_home_names_the_folder_not_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_hub_home: None
) -> None:
    files = {"baseline/model_baseline_segmentor.pt": b"x" * 300_000}
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    home = tmp_path / "home"
    home.mkdir()
    with serve_hub({}, models={"Luffy503/FreeTumor": files}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = CliRunner().invoke(app, ["fetch-weights", "baseline", "--home", str(a_file / "home")])
        assert result.exit_code == 4, result.output
        text = flat(result.output)
        assert f"cannot write in {a_file / 'home'}" in text and "FREETUMOR_HOME" in text and "hub" not in text, text
        for code, words in ((errno.EROFS, "read-only"), (errno.ENOSPC, "no space left")):
            with monkeypatch.context() as patch:
                fail_writes_under(patch, home, code, after=100_000 if code == errno.ENOSPC else 0)
                result = CliRunner().invoke(app, ["fetch-weights", "baseline", "--home", str(home)])
            assert result.exit_code == 4, result.output
            text = flat(result.output)
            assert f"cannot write in {home}" in text and words in text.lower() and "hub" not in text, text
            assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
            assert not [p for p in home.rglob("*") if p.is_file()], "nothing half-written remains"
    assert a_file.read_text() == "not a folder"


def test_fetch_weights_stops_at_once_on_sigterm_and_the_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_hub_home: None
) -> None:
    import os
    import signal
    import subprocess
    import sys

    name = "baseline/model_baseline_segmentor.pt"
    data = bytes(range(256)) * (3 << 12)  # 3 MB: not a checkpoint, only the transfer is looked at here
    home = tmp_path / "home"
    download = home / "downloads" / "Luffy503/FreeTumor" / name
    pace = {name: 0.05}
    with serve_hub({}, models={"Luffy503/FreeTumor": {name: data}}, pace=pace) as (endpoint, log):
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home")}
        cmd = [sys.executable, "-m", "freetumor_cli", "fetch-weights", "baseline", "--home", str(home)]
        job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not any(p.stat().st_size > 200_000 for p in download.parent.glob("*.part")):
                assert job.poll() is None and time.monotonic() < deadline, job.communicate()
                time.sleep(0.02)
            sent = time.monotonic()
            job.send_signal(signal.SIGTERM)
            _, err = job.communicate(timeout=30)
            took = time.monotonic() - sent
        finally:
            job.kill()
        assert job.returncode == 130 and took < 4 and "interrupted" in err, (job.returncode, took, err)
        assert not download.exists()
        pace.clear()
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        CliRunner().invoke(app, ["fetch-weights", "baseline", "--home", str(home)])  # converting it then fails
        starts = [start for path, start in log.ranges if path == name]
        assert starts and starts[0] > 200_000, log.ranges
    assert download.read_bytes() == data and not list(download.parent.glob("*.part"))


def test_fetch_weights_from_a_silent_hub_ends_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_hub_home: None
) -> None:
    monkeypatch.setenv("FREETUMOR_HUB_TIMEOUT", "1")
    with silent_hub() as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        started = time.monotonic()
        result = CliRunner().invoke(app, ["fetch-weights", "baseline", "--home", str(tmp_path / "home")])
        took = time.monotonic() - started
    assert result.exit_code == 4 and took < 10, (took, result.output)
    text = flat(result.output)
    assert "did not answer within 1 s" in text and endpoint in text and "Traceback" not in result.output, text


@pytest.mark.slow
def test_the_authors_workflow_with_their_files(released: dict[str, Path], tmp_path: Path) -> None:
    """Free_train.sh (freesyn, TGAN.pt, its netSeg as quality control), Syn_train.sh (fine-tune TGAN.pt),
    and the baseline as evaluate --checkpoint, all at the method's 1.5 mm and 96³."""
    from freetumor_cli.core.prepare import PrepareConfig, prepare

    from .conftest import write_phantom_root

    root = write_phantom_root(tmp_path / "root", labelled=2, organ_only=2)
    prepare(root, tmp_path / "prepared", PrepareConfig(folds=2, store=False))
    common = ["--data", str(tmp_path / "prepared"), "--workers", "0", "--max-steps", "1"]
    result = CliRunner().invoke(app, [
        "train-seg", *common, "--organ", "all", "--task", "freesyn", "--synth", str(released["tgan"]),
        "--model", "unet-tiny", "--init", str(released["voco"]), "--out", str(tmp_path / "free"), "--set", "val_every=100",
    ])  # fmt: skip
    assert result.exit_code != 0 and "no tensor matches" in flat(result.output), result.output  # VoCo is SwinUNETR's
    result = CliRunner().invoke(app, [
        "train-seg", *common, "--organ", "all", "--task", "freesyn", "--synth", str(released["tgan"]),
        "--model", "unet-tiny", "--out", str(tmp_path / "free2"), "--set", "val_every=100",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    log = (tmp_path / "free2" / "run.log").read_text()
    assert "quality control: " in log and "(netSeg)" in log
    result = CliRunner().invoke(app, [
        "train-synth", *common, "--init", str(released["tgan"]), "--out", str(tmp_path / "syn"), "--set", "heldout_crops=2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = load_generator(tmp_path / "syn" / "checkpoints" / "last").meta
    assert meta["organ_channels"] == {"liver": 0, "pancreas": 0, "kidney": 0} and meta["generator"]["batch_stats"]
    ct = next((root / "Dataset003_Liver" / "imagesTr").glob("*.nii.gz"))
    result = CliRunner().invoke(
        app, ["evaluate", "--checkpoint", str(released["baseline"]), "--data", str(ct), "--out", str(tmp_path / "ev")]
    )
    assert result.exit_code == 0 and (tmp_path / "ev" / "predictions" / ct.name.replace("_0000", "")).is_file(), (
        result.output
    )


def write_chest_root(root: Path, *, labelled: int = 2, organ_only: int = 2) -> Path:
    """A chest data root of 4 mm phantoms: the authors' Covid19_20 copy (``Train_lungmask/``: 1 lung,
    2 lesion) and TCIAcovid19-style lung-only cases."""
    from freetumor_cli.core.io import save_volume
    from freetumor_cli.core.phantom import make_phantom

    for i in range(labelled):
        p = make_phantom((64, 60, 40), (4.0, 4.0, 4.0), seed=60 + i, lung_lesions=2)
        folder = root / "Covid19_20" / "Train_lungmask"
        save_volume(p.ct.array, p.ct, folder / f"volume-covid19-A-{i}_ct.nii.gz")
        save_volume(p.lung.array, p.ct, folder / f"volume-covid19-A-{i}_seg.nii.gz", label=True)
    for i in range(organ_only):
        q = make_phantom((64, 60, 40), (4.0, 4.0, 4.0), seed=70 + i)
        save_volume(q.ct.array, q.ct, root / "TCIAcovid19" / "imagesTr" / f"tcia_{i}_0000.nii.gz")
        save_volume(
            (q.lung.array == 1).astype("uint8"),
            q.ct,
            root / "TCIAcovid19" / "labelsTr" / f"tcia_{i}.nii.gz",
            label=True,
        )
    return root


@pytest.mark.slow
def test_the_chest_workflow_with_the_two_class_baseline(released: dict[str, Path], tmp_path: Path) -> None:
    """``Syn_covid.sh`` and ``Free_covid.sh`` with the authors' 2-output COVID-19 baseline at the chest's
    1.25 × 1.25 × 5 mm and 192 × 192 × 32: converted, as the critic, as quality control, in evaluate."""
    import json

    import numpy as np

    from freetumor_cli.core.io import load_volume
    from freetumor_cli.core.prepare import PrepareConfig, prepare

    root = write_chest_root(tmp_path / "root", organ_only=4)
    prepare(root, tmp_path / "prepared", PrepareConfig(folds=2, store=False))
    run = CliRunner()
    baseline = tmp_path / "covid_baseline"
    result = run.invoke(app, ["fetch-weights", "--convert", str(released["covid"]), "--out", str(baseline)])
    assert result.exit_code == 0, result.output
    common = ["--data", str(tmp_path / "prepared"), "--workers", "0", "--max-steps", "1"]
    result = run.invoke(app, [
        "train-synth", *common, "--region", "chest", "--baseline", str(baseline), "--out", str(tmp_path / "syn"),
        "--set", "base_channels=2", "--set", "volumes_per_batch=1", "--set", "heldout_crops=1", "--set", "labelled_repeats=1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "syn" / "metrics.jsonl").read_text().splitlines()]
    assert any("qc_pass_rate" in r for r in rows) and any("loss_g" in r for r in rows)
    generator = tmp_path / "syn" / "checkpoints" / "last"
    assert json.loads((generator / "generator.json").read_text())["organ_channels"] == {"lung": 0}
    result = run.invoke(app, [
        "train-seg", *common, "--organ", "covid", "--task", "freesyn", "--baseline", str(baseline), "--synth", str(generator),
        "--model", "unet-tiny", "--out", str(tmp_path / "free"), "--set", "crops_per_volume=2", "--set", "val_every=100",
        "--set", "labelled_repeats=1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "quality control: " in (tmp_path / "free" / "run.log").read_text()
    ct = next((root / "Covid19_20" / "Train_lungmask").glob("*_ct.nii.gz"))
    result = run.invoke(
        app, ["evaluate", "--checkpoint", str(baseline), "--data", str(ct), "--out", str(tmp_path / "ev")]
    )
    assert result.exit_code == 0, result.output
    predicted = load_volume(next((tmp_path / "ev" / "predictions").glob("*.nii.gz"))).array
    assert set(np.unique(predicted).tolist()) <= {0, 2}  # background and lesion, in the chest's space


def test_a_model_json_of_earlier_versions_still_loads(tmp_path: Path) -> None:
    """model.json nests the network's preprocessing now; a file with the earlier flat layout (region,
    spacing_mm and window_hu beside the network's sizes) loads into the same configuration."""
    import json

    from freetumor_cli.core.checkpoints import load_checkpoint, save_checkpoint
    from freetumor_cli.core.models import ModelConfig, build_model

    config = ModelConfig(
        name="unet-tiny", out_channels=2, roi=(32, 32, 16), task="covid",
        preprocessing=Preprocessing.for_region("chest", spacing_mm=(4.0, 4.0, 4.0), window_hu=(-1000.0, 500.0)),
        labels={"0": "background", "1": "lesion"},
    )  # fmt: skip
    folder = save_checkpoint(build_model(config), config, tmp_path / "net")
    assert load_checkpoint(folder)[1] == config
    written = json.loads((folder / "model.json").read_text())
    assert written["model"]["preprocessing"]["window_hu"] == [-1000.0, 500.0]
    earlier = {
        "name": "unet-tiny", "out_channels": 2, "roi": [32, 32, 16], "region": "chest", "task": "covid",
        "spacing_mm": [4.0, 4.0, 4.0], "window_hu": [-1000.0, 500.0], "labels": {"0": "background", "1": "lesion"},
        "feature_size": 48,
    }  # fmt: skip
    (folder / "model.json").write_text(json.dumps({"model": earlier, "step": 10}))
    _, loaded, meta = load_checkpoint(folder)
    assert loaded == config and loaded.region == "chest" and meta["step"] == 10
