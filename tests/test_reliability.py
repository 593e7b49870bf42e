"""What a new user tries ends in a result or a clear one-line error, with nothing lost (one test per class).

Each test drives the command line as a user would; an error must be one line (no traceback), carry
its kind's exit code (README, "Exit codes") and leave nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.errors import EXIT_ENVIRONMENT, EXIT_INPUT, EXIT_USAGE
from freetumor_cli.core.io import save_volume
from freetumor_cli.core.outputs import TEMP_PREFIX, OutputLock
from freetumor_cli.core.phantom import Phantom
from freetumor_cli.core.prepare import PrepareConfig
from freetumor_cli.core.preprocess import Preprocessing

from .conftest import flat, phantom_root_of, prepare_phantom_root

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

TINY = ["--model", "unet-tiny", "--workers", "0", "--set", "roi=[32,32,32]", "--set", "spacing_mm=[4,4,4]"]
GiB = 2**30


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, flat(result.output)


def assert_one_line_error(code: int, output: str, expected_code: int, *words: str) -> None:
    assert code == expected_code, (code, output)
    assert "Traceback" not in output and output.count("error:") == 1, output
    for word in words:
        assert word in output, (word, output)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_phantom_root(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    code, output = invoke("train-seg", "--data", prepared, "--out", run, "--max-steps", "1", *TINY)
    assert code == 0, output
    return run


# 1. Memory: checked before the run starts; running out during a step keeps the last saved state.


def test_a_run_that_cannot_fit_is_refused_before_it_starts(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("freetumor_cli.core.memory.host_available", lambda: 8 * GiB)
    code, output = invoke("train-seg", "--data", prepared, "--out", tmp_path / "run", "--workers", "0")
    # SwinUNETR on 4 crops of 96³: about 27 GiB
    assert_one_line_error(code, output, EXIT_ENVIRONMENT, "needs about", "GiB", "8.0 GiB free", "--model unet")
    assert not (tmp_path / "run" / "state").exists()
    code, output = invoke("train-synth", "--data", prepared, "--out", tmp_path / "synth", "--init", tmp_path / "no.pt")
    assert code == EXIT_INPUT, output  # the missing file first: nothing was estimated for it


def test_out_of_memory_in_a_step_is_one_line_and_the_run_resumes(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monai.losses import DiceCELoss

    real = DiceCELoss.forward
    calls = {"n": 0}

    def runs_out_at_the_third_step(self: DiceCELoss, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    run = tmp_path / "run"
    args = ["train-seg", "--data", prepared, "--out", run, "--max-steps", "4", "--set", "save_every_steps=2", *TINY]
    monkeypatch.setattr(DiceCELoss, "forward", runs_out_at_the_third_step)
    code, output = invoke(*args)
    assert_one_line_error(code, output, EXIT_ENVIRONMENT, "ran out of memory", "at step 3", "saved at step 2")
    monkeypatch.setattr(DiceCELoss, "forward", real)
    code, output = invoke(*args, "--resume")
    assert code == 0, output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [
        s for s, line in zip(steps, (run / "metrics.jsonl").read_text().splitlines(), strict=True) if "loss" in line
    ]
    assert losses == [1, 2, 3, 4], "no step lost or repeated in the metrics"


# 2. A prepared folder works from any working folder (and moves with its data root: test_prepare).


def test_a_prepared_folder_works_from_another_folder(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = os.path.relpath(prepared, elsewhere)
    code, output = invoke("train-seg", "--data", data, "--out", "run", "--max-steps", "1", *TINY)
    assert code == 0, output
    code, output = invoke(
        "evaluate",
        "--checkpoint",
        "run/checkpoints/last",
        "--data",
        f"{data}/datalists/liver_fold0.json",
        "--out",
        "ev",
    )
    assert code == 0, output
    assert json.loads(Path("ev/summary.json").read_text())["cases"] >= 1


@pytest.mark.parametrize("data", ["data/imagesTr", "data/imagesTr/case_0000.nii.gz"])
def test_evaluate_a_checkpoint_on_relative_paths_of_an_nnunet_layout(
    tiny_run: Path, phantom_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str
) -> None:
    """Labels found beside relative CT paths are scored from any --out (ground_truth.json holds absolute paths)."""
    monkeypatch.chdir(tmp_path)
    code, output = invoke("evaluate", "--checkpoint", tiny_run / "checkpoints" / "last", "--data", data, "--out", "ev")
    assert code == 0, output
    assert json.loads(Path("ev/summary.json").read_text())["cases"] == 1
    for entry in json.loads(Path("ev/ground_truth.json").read_text())["testing"]:
        assert Path(entry["image"]).is_absolute() and Path(entry["label"]).is_file()


def test_an_unreadable_case_met_in_a_loader_worker_is_logged_and_replaced(prepared: Path, tmp_path: Path) -> None:
    root = phantom_root_of(prepared)
    copy = tmp_path / root.name  # the prepared folder's paths are relative: the copies keep their places
    shutil.copytree(root, copy)
    shutil.copytree(prepared, tmp_path / "area0" / "prepared")
    damaged = next((copy / "Dataset003_Liver" / "imagesTr").iterdir())
    damaged.write_bytes(damaged.read_bytes()[:2000])  # truncated: the store's copy is stale now
    moved = tmp_path / "area0" / "prepared"
    args = ["--out", tmp_path / "run", "--max-steps", "3", *TINY[:2], *TINY[4:]]
    code, output = invoke("train-seg", "--data", moved, "--workers", "1", "--set", "labelled_repeats=3", *args)
    assert code == 0, output  # a multi-day run does not die on one case
    log = (tmp_path / "run" / "run.log").read_text()
    assert "cannot read case Dataset003_Liver/" in log and "drawn again from the next case" in log
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "loss" in r][-1]["bad_samples"] >= 1
    (copy / "BTCV" / "imagesTr" / "img0000.nii.gz").unlink()
    args[1] = tmp_path / "run2"
    code, output = invoke("train-seg", "--data", moved, "--workers", "0", *args)
    assert_one_line_error(code, output, EXIT_INPUT, "files in", "are missing", "move it together with the data root")


# 3. Numbers have bounds, voxels must be finite, voxel sizes non-zero.


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-steps", "0"], "max_steps must be at least 1"),
        (["--max-steps", "-1"], "max_steps must be at least 1"),
        (["--workers", "-1"], "workers must be at least 0"),
        (["--epochs", "0"], "epochs must be at least 1"),
    ],
)
def test_training_numbers_out_of_range_are_usage_errors(
    prepared: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    code, output = invoke("train-seg", "--data", prepared, "--out", tmp_path / "run", *flags)
    assert_one_line_error(code, output, EXIT_USAGE, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--count", "1000000"], "count must lie in 1..100"),
        (["--count", "100000000000"], "count must lie in 1..100"),
        (["--copies", "0"], "copies must lie in 1..1000"),
    ],
)
def test_synthesis_numbers_out_of_range_are_usage_errors(
    phantom_files: tuple[Path, Path], tmp_path: Path, flags: list[str], message: str
) -> None:
    image, labels = phantom_files
    code, output = invoke(
        "synthesize", "--in", image, "--labels", labels, "--organ", "liver", "-o", tmp_path / "o", *flags
    )
    assert_one_line_error(code, output, EXIT_USAGE, message)
    assert not (tmp_path / "o").exists()


def test_infinite_voxels_and_zero_voxel_sizes_are_bad_input(small_phantom: Phantom, tmp_path: Path) -> None:
    labels = save_volume(small_phantom.labels.array, small_phantom.ct, tmp_path / "seg.nii.gz", label=True)
    ct = small_phantom.ct.array.astype(np.float32)
    ct[3, 3, 3] = np.inf
    infinite = save_volume(ct, small_phantom.ct, tmp_path / "inf.nii.gz")
    code, output = invoke("synthesize", "--in", infinite, "--labels", labels, "--organ", "liver", "-o", tmp_path / "a")
    assert_one_line_error(code, output, EXIT_INPUT, "NaN or infinite")
    # pixdim 0 as stored (nibabel would silently read 1 mm), then an sform with a flat axis
    nib.save(nib.Nifti1Image(small_phantom.ct.array.astype(np.int16), small_phantom.ct.affine), tmp_path / "z.nii")
    raw = bytearray((tmp_path / "z.nii").read_bytes())
    raw[88:92] = struct.pack("<f", 0.0)  # pixdim[3]
    raw[252:256] = struct.pack("<hh", 1, 0)  # qform_code 1, sform_code 0
    (tmp_path / "z.nii").write_bytes(bytes(raw))
    code, output = invoke(
        "synthesize", "--in", tmp_path / "z.nii", "--labels", labels, "--organ", "liver", "-o", tmp_path / "b"
    )
    assert_one_line_error(code, output, EXIT_INPUT, "zero voxel size")
    flat_affine = small_phantom.ct.affine.copy()
    flat_affine[:3, 2] = 0
    image = nib.Nifti1Image(small_phantom.ct.array.astype(np.int16), None)
    image.set_sform(flat_affine, code=1)
    nib.save(image, tmp_path / "flat.nii.gz")
    code, output = invoke(
        "synthesize", "--in", tmp_path / "flat.nii.gz", "--labels", labels, "--organ", "liver", "-o", tmp_path / "b"
    )
    assert_one_line_error(code, output, EXIT_INPUT, "no valid voxel size")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# 4. Outputs are as readable as the umask says.


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(phantom_files: tuple[Path, Path], tmp_path: Path, umask: int) -> None:
    image, labels = phantom_files
    old = os.umask(umask)
    try:
        code, output = invoke(
            "synthesize", "--in", image, "--labels", labels, "--organ", "liver", "-o", tmp_path / "o", "--preview"
        )
    finally:
        os.umask(old)
    assert code == 0, output
    files = [p for p in (tmp_path / "o").iterdir() if p.is_file()]
    assert len(files) == 4
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path.name, oct(path.stat().st_mode))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_and_training_state_follow_the_umask(prepared: Path, tmp_path: Path, umask: int) -> None:
    """safetensors creates its files private: checkpoints, generators and the saved state must still be as
    readable as every other output (a colleague's --baseline on a shared cluster)."""
    from freetumor_cli.core.checkpoints import save_generator
    from freetumor_cli.core.gan import GanConfig, make_discriminator, make_generator

    old = os.umask(umask)
    try:
        code, output = invoke("train-seg", "--data", prepared, "--out", tmp_path / "run", "--max-steps", "1", *TINY)
        gan = GanConfig(base_channels=4)
        save_generator(
            make_generator(gan), gan, tmp_path / "gen", preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(4, 4, 4)), roi=(32,) * 3,
            organ_channels={"liver": 0}, discriminator=make_discriminator(gan),
        )  # fmt: skip
    finally:
        os.umask(old)
    assert code == 0, output
    files = [p for folder in ("run", "gen") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.relative_to(tmp_path).as_posix() for p in weights} >= {
        "run/checkpoints/best/model.safetensors", "run/checkpoints/last/model.safetensors",
        "run/state/model.safetensors", "gen/generator.safetensors", "gen/discriminator.safetensors",
    }  # fmt: skip
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (
            str(path.relative_to(tmp_path)),
            oct(path.stat().st_mode),
        )


# 5. Ordinary mistakes give one line, not a traceback.


def test_out_that_is_a_file_or_cannot_be_created_for_every_command(
    prepared: Path, tiny_run: Path, phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, labels = phantom_files
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    commands = {
        "synthesize": ["synthesize", "--in", image, "--labels", labels, "--organ", "liver"],
        "evaluate": ["evaluate", "--checkpoint", tiny_run / "checkpoints" / "last", "--data", image],
        "prepare": ["prepare", "--data-root", phantom_root_of(prepared)],
        "train-seg": ["train-seg", "--data", prepared, *TINY],
        "train-synth": ["train-synth", "--data", prepared, "--baseline", tiny_run / "checkpoints" / "last"],
    }
    for name, args in commands.items():
        code, output = invoke(*args, "--out", a_file)
        assert code in (EXIT_INPUT, EXIT_USAGE, EXIT_ENVIRONMENT) and "Traceback" not in output, (name, output)
        assert "is a file" in output, (name, output)
        code, output = invoke(*args, "--out", a_file / "under")
        assert code in (EXIT_INPUT, EXIT_ENVIRONMENT) and "Traceback" not in output, (name, output)
        assert "cannot create" in output or "is a file" in output, (name, output)
    assert a_file.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_under_a_read_only_folder(phantom_files: tuple[Path, Path], tmp_path: Path) -> None:
    image, labels = phantom_files
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, output = invoke("synthesize", "--in", image, "--labels", labels, "--organ", "liver", "-o", locked / "o")
    assert_one_line_error(code, output, EXIT_ENVIRONMENT, "cannot create", "permission denied")


def test_damaged_checkpoint_generator_data_list_and_resume_state(
    prepared: Path, tiny_run: Path, phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, labels = phantom_files
    empty = tmp_path / "empty_model"
    shutil.copytree(tiny_run / "checkpoints" / "last", empty)
    (empty / "model.json").write_text("{}")
    code, output = invoke("evaluate", "--checkpoint", empty, "--data", image, "--out", tmp_path / "ev")
    assert_one_line_error(code, output, EXIT_INPUT, "model.json")

    generator = tmp_path / "generator"
    generator.mkdir()
    (generator / "generator.json").write_text("{not json")
    (generator / "generator.safetensors").write_bytes(b"")
    code, output = invoke(
        "synthesize",
        "--in",
        image,
        "--labels",
        labels,
        "--organ",
        "liver",
        "--generator",
        generator,
        "-o",
        tmp_path / "g",
    )
    assert_one_line_error(code, output, EXIT_INPUT, "generator.json")  # --generator alone: the generator engine

    damaged = tmp_path / "prepared_copy"
    shutil.copytree(prepared, damaged, ignore=shutil.ignore_patterns("store*"))
    (damaged / "datalists" / "liver_fold0.json").write_text('{"training": [')
    code, output = invoke("train-seg", "--data", damaged, "--out", tmp_path / "run", *TINY)
    assert_one_line_error(code, output, EXIT_INPUT, "liver_fold0.json", "damaged")

    run = tmp_path / "resumed"
    shutil.copytree(tiny_run, run)
    (run / "state" / "progress.json").write_text("[1, 2")
    code, output = invoke("train-seg", "--data", prepared, "--out", run, "--resume", *TINY)
    assert_one_line_error(code, output, EXIT_INPUT, "cannot resume")
    shutil.rmtree(run)
    shutil.copytree(tiny_run, run)
    code, output = invoke(
        "train-seg", "--data", prepared, "--out", run, "--resume", "--model", "unet", "--workers", "0"
    )
    assert_one_line_error(code, output, EXIT_INPUT, "cannot resume")


# 6. No silent loss: a busy folder stops the second run; reruns do not eat their own outputs.


def test_a_second_run_into_a_busy_folder_stops(phantom_files: tuple[Path, Path], tmp_path: Path) -> None:
    image, labels = phantom_files
    with OutputLock(tmp_path / "o", "synthesize"):
        code, output = invoke("synthesize", "--in", image, "--labels", labels, "--organ", "liver", "-o", tmp_path / "o")
        assert_one_line_error(code, output, EXIT_ENVIRONMENT, "in use by freetumor synthesize")
    assert not (tmp_path / "o").exists(), "the refused run wrote nothing (the lock's empty folder is gone)"


def test_out_inside_the_input_folder_reruns_without_reading_its_outputs(
    phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, labels = phantom_files
    folder = image.parent
    (folder / f"{TEMP_PREFIX}case_liver_synthetic.nii.gz.x1y2.tmp.nii.gz").write_bytes(b"half")  # what a kill -9 leaves
    first = invoke("synthesize", "--in", folder, "--labels", labels.parent, "--organ", "liver", "-o", folder)
    assert first[0] == 0, first[1]
    assert not list(folder.glob(f"{TEMP_PREFIX}*")), "stale temporaries are removed"
    code, output = invoke("synthesize", "--in", folder, "--labels", labels.parent, "--organ", "liver", "-o", folder)
    assert code == 0 and "1 case(s) done before, skipped" in output, output
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        ["case_0000.nii.gz", "case_liver_synthetic.nii.gz", "case_liver_synthetic_label.nii.gz",
         "case_liver_synthetic.json"]
    ), names  # fmt: skip
    code, output = invoke("synthesize", "--in", folder, "--labels", labels.parent, "--organ", "kidney", "-o", folder)
    assert code == 0 and (folder / "case_kidney_synthetic.nii.gz").is_file(), output  # organs do not collide


def test_a_failing_prepare_leaves_no_manifest(tmp_path: Path) -> None:
    root = tmp_path / "root" / "BTCV" / "imagesTr"
    root.mkdir(parents=True)
    (root / "img0001.nii.gz").write_bytes(b"not a nifti")
    code, output = invoke("prepare", "--data-root", tmp_path / "root", "--out", tmp_path / "prepared")
    assert code == EXIT_INPUT and "Traceback" not in output, output
    assert not (tmp_path / "prepared" / "manifest.jsonl").exists()


# 7. Options are not silently ignored.


def test_generator_with_the_rules_engine_is_refused(phantom_files: tuple[Path, Path], tmp_path: Path) -> None:
    image, labels = phantom_files
    code, output = invoke(
        "synthesize", "--in", image, "--labels", labels, "--organ", "liver", "--engine", "rules",
        "--generator", tmp_path, "-o", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(code, output, EXIT_USAGE, "engine is rules")


def test_a_smoke_run_skips_the_validation_of_an_unfinished_epoch(tiny_run: Path) -> None:
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_tumor_dice" in r for r in rows)
    assert "validation skipped" in (tiny_run / "run.log").read_text()


# 8. Help and pictures say what the tool does.


def test_help_examples_work_and_flags_take_no_value() -> None:
    from freetumor_cli.commands._common import SET_EXAMPLES
    from freetumor_cli.core.config import build_config
    from freetumor_cli.core.evaluate import EvaluateConfig
    from freetumor_cli.core.synthesize import SynthesizeConfig
    from freetumor_cli.core.train_seg import TrainSegConfig
    from freetumor_cli.core.train_synth import TrainSynthConfig

    configs = {
        "synthesize": SynthesizeConfig, "train-seg": TrainSegConfig, "train-synth": TrainSynthConfig,
        "prepare": PrepareConfig, "evaluate": EvaluateConfig,
    }  # fmt: skip
    for command, cls in configs.items():
        build_config(cls, file=None, overrides=[SET_EXAMPLES[command]], flags={})
        help_text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert f"--set {SET_EXAMPLES[command]}" in flat(help_text), command
    for command in (*configs, "fetch-labels", "fetch-weights", "demo"):
        help_text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in help_text and "--quiet" in help_text and "--verbose" in help_text, command
    assert "-o" in flat(CliRunner().invoke(app, ["synthesize", "--help"], env={"COLUMNS": "200"}).output)


def test_previews_are_radiological() -> None:
    from freetumor_cli.core.preview import displayed_slice

    ras = np.zeros((20, 20, 20))
    ras[18, 10, 10] = 1  # patient's right (high x in RAS+)
    ras[10, 18, 12] = 2  # anterior
    ras[10, 10, 18] = 3  # superior
    axial = displayed_slice(ras, 10, axis=2)
    assert np.argwhere(axial == 1)[0][1] < 10, "the patient's right is on the image's left"
    assert np.argwhere(displayed_slice(ras, 12, axis=2) == 2)[0][0] < 10, "anterior at the top of axial slices"
    assert np.argwhere(displayed_slice(ras, 10, axis=1) == 3)[0][0] < 10, "superior at the top of coronal slices"


def test_offline_hint_does_not_ask_for_what_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from freetumor_cli.core.hub import HubClient

    def failure(exc: Exception) -> str:
        return str(HubClient("https://hub", None, 30).failure(exc, doing="", url="", repo="Luffy503/FreeTumor"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error = failure(OSError("offline mode is enabled"))
    assert "HF_HUB_OFFLINE is set" in error and "unset HF_HUB_OFFLINE" in error
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "set HF_HUB_OFFLINE=1" in failure(OSError("down"))


# Also: quiet, verbose, devices.


def test_quiet_verbose_and_device(phantom_files: tuple[Path, Path], tmp_path: Path) -> None:
    image, labels = phantom_files
    result = CliRunner().invoke(
        app,
        [
            "synthesize",
            "--in",
            str(image),
            "--labels",
            str(labels),
            "--organ",
            "liver",
            "-o",
            str(tmp_path / "q"),
            "-q",
        ],
    )
    assert result.exit_code == 0 and result.stdout == "", result.output
    code, output = invoke("synthesize", "--in", image, "--organ", "liver", "-q", "-v", "-o", tmp_path / "x")
    assert_one_line_error(code, output, EXIT_USAGE, "--quiet and --verbose")
    if not torch.cuda.is_available():
        code, output = invoke(
            "synthesize", "--in", image, "--labels", labels, "--organ", "liver", "--generator", tmp_path,
            "--device", "cuda:3", "-o", tmp_path / "d",
        )  # fmt: skip
        assert_one_line_error(code, output, EXIT_USAGE, "cuda:3 is not available")
    code, output = invoke("synthesize", "--in", image, "--organ", "liver", "--device", "gpu", "-o", tmp_path / "d")
    assert_one_line_error(code, output, EXIT_USAGE, "unknown device 'gpu'")


# 5. Files damaged after the fact: checkpoints, saved states, metrics.


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_checkpoint_is_one_line_wherever_it_is_read(
    prepared: Path, tiny_run: Path, tmp_path: Path, totalseg_case: Path
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run / "checkpoints" / "last", damaged)
    truncate(damaged / "model.safetensors")
    run = tmp_path / "run"
    code, output = invoke("train-seg", "--data", prepared, "--out", run, "--init", damaged, "--max-steps", "1", *TINY)
    assert_one_line_error(code, output, EXIT_INPUT, "damaged or truncated", "model.safetensors")
    code, output = invoke("evaluate", "--checkpoint", damaged, "--data", prepared / "datalists" / "liver_fold0.json",
                          "--out", tmp_path / "ev")  # fmt: skip
    assert_one_line_error(code, output, EXIT_INPUT, "damaged or truncated")
    code, output = invoke("train-seg", "--data", prepared, "--out", tmp_path / "fs", "--task", "freesyn",
                          "--baseline", damaged, "--max-steps", "1", *TINY)  # fmt: skip
    assert_one_line_error(code, output, EXIT_INPUT, "damaged or truncated")


def test_a_truncated_generator_is_one_line(tmp_path: Path, totalseg_case: Path) -> None:
    from freetumor_cli.core.checkpoints import save_generator
    from freetumor_cli.core.gan import GanConfig, make_generator

    gan = GanConfig(region="abdomen", base_channels=4)
    folder = save_generator(
        make_generator(gan), gan, tmp_path / "g", preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(1.5,) * 3), roi=(32,) * 3,
        organ_channels={"liver": 0},
    )  # fmt: skip
    truncate(folder / "generator.safetensors", 0.3)
    code, output = invoke("synthesize", "--in", totalseg_case / "ct.nii.gz", "--labels", totalseg_case / "organs.nii.gz", "--label-scheme", "freetumor",
                          "--organ", "liver", "--size", "small", "--generator", folder, "--out", tmp_path / "out")  # fmt: skip
    assert_one_line_error(code, output, EXIT_INPUT, "generator", "damaged or truncated")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))


@pytest.mark.parametrize("damage", ["truncated model", "pickle payload in the optimizer", "torn metrics line"])
def test_a_damaged_saved_state(prepared: Path, tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    base = [
        "train-seg",
        "--data",
        prepared,
        "--out",
        run,
        "--set",
        "save_every_steps=1",
        "--set",
        "val_every=100",
        *TINY,
    ]
    code, output = invoke(*base, "--max-steps", "2")
    assert code == 0, output
    ran = tmp_path / "payload-ran"
    if damage == "truncated model":
        truncate(run / "state" / "model.safetensors")
    elif damage == "pickle payload in the optimizer":

        class Payload:
            def __reduce__(self) -> tuple[object, ...]:
                return (os.system, (f"touch {ran}",))

        import pickle

        (run / "state" / "optimizer.bin").write_bytes(pickle.dumps(Payload()))
    else:
        with (run / "metrics.jsonl").open("a") as handle:
            handle.write('{"loss": 0.5, "lr": 0.0003, "ep')  # the run was killed writing its last row
    code, output = invoke(*base, "--max-steps", "3", "--resume")
    if damage == "torn metrics line":
        assert code == 0, output
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    else:
        assert_one_line_error(code, output, EXIT_INPUT, "cannot resume from", "damaged or unsafe")
        assert not ran.exists(), "code in a saved state ran"
