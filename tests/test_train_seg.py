"""train-seg at tiny scale: a tiny UNet on 32³ crops of 4 mm phantoms."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.phantom import make_phantom

from .conftest import flat, prepare_phantom_root

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from freetumor_cli.core.seg_data import cutmix_along_axis, quality_control  # noqa: E402
from freetumor_cli.core.train_seg import TrainSegConfig, lr_factor, train_segmentation  # noqa: E402

TINY = ["--model", "unet-tiny", "--workers", "0", "--set", "roi=[32,32,32]", "--set", "spacing_mm=[4,4,4]"]


def tiny_config(**changes: object) -> TrainSegConfig:
    base = {
        "model": "unet-tiny",
        "roi": (32, 32, 32),
        "workers": 0,
        "spacing_mm": (4.0, 4.0, 4.0),
        "max_steps": 2,
        "save_every_steps": 2,
    }
    return TrainSegConfig(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_phantom_root(tmp_path_factory)


@pytest.fixture(scope="module")
def baseline(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "baseline"
    result = CliRunner().invoke(
        app,
        [
            "train-seg",
            "--data",
            str(prepared),
            "--organ",
            "liver",
            "--task",
            "onlylabeled",
            "--out",
            str(run),
            "--max-steps",
            "2",
            "--set",
            "val_min_steps=1",  # a 2-step run that validates, as a baseline's best checkpoint does
            *TINY,
        ],
    )
    assert result.exit_code == 0, result.output
    return run / "checkpoints" / "best"


def test_onlylabeled_run_folder_explains_itself(baseline: Path) -> None:
    run = baseline.parent.parent
    for name in ("config.yaml", "labels.json", "metrics.jsonl", "curves.png", "state/progress.json"):
        assert (run / name).is_file(), name
    assert any((run / "logs").rglob("events.out.tfevents*")), "no TensorBoard log"
    meta = json.loads((baseline / "model.json").read_text())
    assert meta["model"]["name"] == "unet-tiny" and meta["model"]["out_channels"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert any("val_tumor_dice" in r for r in rows)


def test_freesyn_with_quality_control(prepared: Path, baseline: Path, tmp_path: Path) -> None:
    summary = train_segmentation(
        prepared, tmp_path / "freesyn", tiny_config(mode="freesyn", max_steps=2, qc_threshold=0.0), baseline=baseline
    )
    assert summary.steps == 2 and all(np.isfinite(summary.losses))
    rows = [json.loads(line) for line in (tmp_path / "freesyn" / "metrics.jsonl").read_text().splitlines()]
    assert any("synthetic_tumor_voxels" in r for r in rows)
    assert summary.qc_acceptance is not None


def test_quality_control_gate_at_the_boundary() -> None:
    probs = torch.zeros(3, 3, 4, 4, 4)
    probs[:, 0] = 1.0  # background everywhere...
    mask = torch.zeros(3, 1, 4, 4, 4, dtype=torch.bool)
    mask[0, 0, :, :, :2] = True  # 32 voxels
    mask[1, 0, :, :, :2] = True
    flat0 = probs[0, :, :, :, :2].reshape(3, -1)
    flat0[2, :23] = 2.0  # 23 / 32 = 71.9 % called tumor
    probs[0, :, :, :, :2] = flat0.reshape(3, 4, 4, 2)
    flat1 = probs[1, :, :, :, :2].reshape(3, -1)
    flat1[2, :22] = 2.0  # 22 / 32 = 68.75 %
    probs[1, :, :, :, :2] = flat1.reshape(3, 4, 4, 2)
    accepted, shares = quality_control(probs, mask, [2, 2, 2], 0.7)
    assert accepted == [True, False, False]  # the third crop has no synthetic tumor
    assert shares[0] == pytest.approx(23 / 32) and shares[1] == pytest.approx(22 / 32) and shares[2] == 0.0
    exact = quality_control(probs, mask, [2, 2, 2], 23 / 32)[0]
    assert exact[0] is False  # strictly more than the threshold


def test_cutmix_swaps_one_slab_along_one_axis() -> None:
    images = torch.stack([torch.full((1, 8, 8, 8), float(i)) for i in range(4)])
    labels = images.clone()
    mixed_i, mixed_l = cutmix_along_axis(images, labels, np.random.default_rng(5), alpha=0.2)
    assert torch.equal(mixed_i, mixed_l)
    for b in range(4):
        values = set(mixed_i[b].unique().tolist())
        assert len(values) <= 2 and float(b) in values | {float(v) for v in range(4)}


def test_lr_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(s, warmup_steps=4, total_steps=12) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and factors[-1] < 0.1
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


def test_resume_reproduces_the_uninterrupted_losses(prepared: Path, tmp_path: Path) -> None:
    config = tiny_config(max_steps=4, save_every_steps=2, augment=True)
    full = train_segmentation(prepared, tmp_path / "full", config)

    class Interrupted(Exception):
        pass

    def stop_after_two(step: int, _total: int, _stats: dict[str, float]) -> None:
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_segmentation(prepared, tmp_path / "cut", config, on_step=stop_after_two)
    resumed = train_segmentation(prepared, tmp_path / "cut", config, resume=True)
    assert resumed.steps == 4
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # no step twice
    assert all(r["store_share"] == 1.0 for r in rows if "loss" in r)  # resumed from the case store
    assert "case store" in resumed.data


def test_a_loader_worker_draws_what_a_run_without_one_draws_across_epochs_and_a_resume(
    prepared: Path, tmp_path: Path
) -> None:
    """Loader workers live across epochs and read the epoch from shared memory: a run with one, stopped
    mid-epoch and resumed, takes the samples and losses of a run without workers, step for step (two
    steps an epoch here, so five steps are three epochs)."""
    from dataclasses import replace

    config = tiny_config(max_steps=5, save_every_steps=1, augment=True)
    train_segmentation(prepared, tmp_path / "inline", config)

    class Interrupted(Exception):
        pass

    def stop_after_three(step: int, _total: int, _stats: dict[str, float]) -> None:
        if step == 3:  # in the second epoch
            raise Interrupted

    worker = replace(config, workers=1)
    with pytest.raises(Interrupted):
        train_segmentation(prepared, tmp_path / "worker", worker, on_step=stop_after_three)
    resumed = train_segmentation(prepared, tmp_path / "worker", worker, resume=True)
    assert resumed.steps == 5 and resumed.epochs == 3

    def steps(run: str) -> list[tuple[int, int, list[int], float]]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["epoch"], r["samples"], r["loss"]) for r in rows if "loss" in r]

    inline, workers = steps("inline"), steps("worker")
    assert [s[:3] for s in workers] == [s[:3] for s in inline] and len(inline) == 5
    np.testing.assert_allclose([s[3] for s in workers], [s[3] for s in inline], rtol=1e-5)


def test_an_optimizer_state_saved_without_the_fused_update_resumes_under_a_gradient_scaler() -> None:
    """A state saved by an earlier version's per-tensor AdamW makes the fused one per-tensor again when
    loaded; under a gradient scaler (fp16) its step must then get unscaled gradients, not fail."""
    from freetumor_cli.core.training import match_update_path

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: object = None) -> None:
        loss = model(torch.ones(3, 4)).square().mean()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()  # type: ignore[attr-defined]
            scaler.step(optimizer)  # type: ignore[attr-defined]
            scaler.update()  # type: ignore[attr-defined]
        optimizer.zero_grad()

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    for saved_by in ("per-tensor", "fused"):
        saving = torch.optim.AdamW(model.parameters(), amsgrad=True, fused=saved_by == "fused" or None)
        step(model, saving)
        resumed = torch.optim.AdamW(model.parameters(), amsgrad=True, fused=True)
        resumed.load_state_dict(saving.state_dict())
        match_update_path(resumed)
        assert resumed._step_supports_amp_scaling is (saved_by == "fused"), saved_by  # type: ignore[attr-defined]
        step(model, resumed, torch.amp.GradScaler("cpu"))  # fails without match_update_path


def test_a_run_saved_with_the_per_tensor_update_resumes_with_it(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run an earlier version saved (per-tensor AdamW) resumes on that update: the losses of an
    uninterrupted per-tensor run, and an optimizer that no longer tells a gradient scaler it unscales."""
    from freetumor_cli.core import train_seg, training

    config = tiny_config(max_steps=4, save_every_steps=2)
    monkeypatch.setattr(train_seg, "fused_update", lambda _device: None)  # the earlier version's optimizer
    full = train_segmentation(prepared, tmp_path / "full", config)
    with pytest.raises(KeyboardInterrupt):
        train_segmentation(
            prepared, tmp_path / "cut", config,
            on_step=lambda step, _total, _stats: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else None,
        )  # fmt: skip
    monkeypatch.undo()
    matched: list[tuple[object, bool]] = []

    def spy(optimizer: torch.optim.Optimizer) -> None:
        training_match(optimizer)
        matched.append((optimizer.param_groups[0]["fused"], optimizer._step_supports_amp_scaling))  # type: ignore[attr-defined]

    training_match = training.match_update_path
    monkeypatch.setattr(training, "match_update_path", spy)
    resumed = train_segmentation(prepared, tmp_path / "cut", config, resume=True)
    assert matched == [(None, False)]
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-5)


@pytest.mark.parametrize("moment", ["after_state_files", "between_renames"])
def test_a_run_killed_while_its_state_is_rewritten_resumes_with_the_same_losses(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """Killed at the second save (step 4 of 6): after the new state's files are written but before its
    progress (the resume must not pair the new weights with the old step), or between the renames."""
    import accelerate

    from freetumor_cli.core import training

    config = tiny_config(max_steps=6, save_every_steps=2, val_every=100)
    full = train_segmentation(prepared, tmp_path / "full", config)

    class Killed(BaseException):
        pass

    saves = {"n": 0}
    real_save, real_rename = accelerate.Accelerator.save_state, os.rename

    def save_state(self: object, *args: object, **kwargs: object) -> object:
        saves["n"] += 1
        result = real_save(self, *args, **kwargs)
        if saves["n"] == 2 and moment == "after_state_files":
            raise Killed
        return result

    def rename(src: object, dst: object) -> None:
        real_rename(src, dst)
        if saves["n"] == 2 and str(dst).endswith("state.old") and moment == "between_renames":
            raise Killed

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    monkeypatch.setattr(training.os, "rename", rename)
    with pytest.raises(Killed):
        train_segmentation(prepared, tmp_path / "cut", config)
    monkeypatch.undo()
    resumed = train_segmentation(prepared, tmp_path / "cut", config, resume=True)
    assert resumed.steps == 6
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-5)
    assert not (tmp_path / "cut" / "state.next").exists() and not (tmp_path / "cut" / "state.old").exists()


def test_bad_inputs(prepared: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train-seg", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "prepare first" in result.output
    result = runner.invoke(
        app, ["train-seg", "--data", str(prepared), "--out", str(tmp_path / "r"), "--organ", "brain"]
    )
    assert result.exit_code != 0 and "'brain' is not one of" in flat(result.output)
    result = runner.invoke(app, ["train-seg", "--data", str(prepared), "--out", str(tmp_path / "r"), "--resume", *TINY])
    assert result.exit_code != 0 and "nothing to resume" in result.output
    result = runner.invoke(
        app, ["train-seg", "--data", str(prepared), "--out", str(tmp_path / "r"), "--set", "roi=[32,32,32]"]
    )
    assert result.exit_code != 0 and "SwinUNETR needs" in result.output


SCHEDULE = ["--set", "epochs=2", "--set", "warmup_epochs=1", "--set", "labelled_repeats=4", "--set", "val_every=100"]


def launch(out: Path, prepared: Path, *extra: str, processes: int = 2) -> subprocess.Popen[str]:
    """train-seg through torchrun: ``processes`` CPU processes (gloo), the command line unchanged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "-m", "freetumor_cli", "train-seg", "--data", str(prepared), "--organ", "liver", "--out", str(out),
        *TINY, *SCHEDULE, "--set", "save_every_steps=2", *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def step_rows(run: Path) -> dict[int, dict[str, object]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def one_and_two_processes(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    runs = tmp_path_factory.mktemp("ddp")
    result = CliRunner().invoke(
        app, ["train-seg", "--data", str(prepared), "--out", str(runs / "one"), *TINY, *SCHEDULE]
    )
    assert result.exit_code == 0, result.output
    done = launch(runs / "two", prepared, "--workers", "1")  # a loader worker per process, alive across epochs
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 0, output[-3000:]
    return runs / "one", runs / "two"


def test_two_processes_follow_the_one_process_schedule_and_sample_order(
    one_and_two_processes: tuple[Path, Path],
) -> None:
    one, two = (step_rows(run) for run in one_and_two_processes)
    assert len(one) == 16 and len(two) == 8  # 8 samples an epoch; each of 2 processes takes half
    assert [two[s]["epoch"] for s in sorted(two)] == [0] * 4 + [1] * 4  # two epochs, the workers persist
    lr_one = [one[s]["lr"] for s in sorted(one)]
    lr_two = [two[s]["lr"] for s in sorted(two)]
    step_change = max(abs(a - b) for a, b in itertools.pairwise(lr_one))
    for k, lr in enumerate(lr_two, start=1):  # the same fraction of training: step k of 8 is step 2k of 16
        assert abs(lr - one[2 * k]["lr"]) <= step_change + 1e-12, (k, lr, one[2 * k]["lr"])
    assert max(lr_two) == pytest.approx(max(lr_one))
    # Each row holds the rate its step used: warm-up from lr / warm-up steps, cosine after it.
    base = TrainSegConfig().lr
    for rows, warmup, total in ((one, 8, 16), (two, 4, 8)):
        expected = [base * lr_factor(s - 1, warmup_steps=warmup, total_steps=total) for s in sorted(rows)]
        assert [rows[s]["lr"] for s in sorted(rows)] == pytest.approx(expected, rel=1e-9)
        assert rows[1]["lr"] == pytest.approx(base / warmup) and rows[warmup]["lr"] == pytest.approx(base)
    # Sample order: each step of the two processes holds the two samples of two 1-process steps.
    for k in sorted(two):
        assert two[k]["samples"] == one[2 * k - 1]["samples"] + one[2 * k]["samples"]
    assert all(r["store_share"] == 1.0 for r in two.values())  # crops from the case store
    assert "case store" in (one_and_two_processes[1] / "run.log").read_text()
    assert (one_and_two_processes[1] / "checkpoints" / "last" / "model.safetensors").is_file()


def test_a_killed_two_process_run_resumes_on_the_same_schedule(
    one_and_two_processes: tuple[Path, Path], prepared: Path, tmp_path: Path
) -> None:
    import signal
    import time

    full = step_rows(one_and_two_processes[1])
    run = tmp_path / "killed"
    job = launch(run, prepared, "--set", "save_every_steps=2")
    progress = run / "state" / "progress.json"
    deadline = time.time() + 240
    while not progress.is_file() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)  # torchrun's workers go with it
    job.wait(timeout=60)
    subprocess.run(["pkill", "-9", "-f", str(run)], check=False)
    saved = json.loads(progress.read_text())["step"]
    assert 0 < saved < len(full), "the run ended before it could be killed"
    resumed = launch(run, prepared, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    rows = step_rows(run)
    assert sorted(rows) == sorted(full)
    for k in sorted(full):
        assert rows[k]["lr"] == pytest.approx(full[k]["lr"], rel=1e-9) and rows[k]["samples"] == full[k]["samples"]
        assert rows[k]["loss"] == pytest.approx(full[k]["loss"], rel=1e-4)


def test_prediction_keeps_the_input_geometry(baseline: Path, totalseg_case: Path, tmp_path: Path) -> None:
    import nibabel as nib

    from .conftest import oblique_affine

    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(baseline),
            "--data",
            str(totalseg_case / "ct.nii.gz"),
            "--out",
            str(tmp_path / "real"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "nothing to score" in result.output
    src, out = nib.load(totalseg_case / "ct.nii.gz"), nib.load(tmp_path / "real" / "predictions" / "ct.nii.gz")
    assert out.shape == src.shape
    np.testing.assert_array_equal(out.affine, src.affine)
    assert np.issubdtype(out.get_data_dtype(), np.integer)
    # An oblique, anisotropic grid comes back exactly too.
    p = make_phantom((48, 40, 12), (4.0, 4.0, 4.0), seed=1)
    affine = oblique_affine((3.5, 4.5, 6.0))
    nib.save(nib.Nifti1Image(p.ct.array, affine), tmp_path / "oblique.nii.gz")
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(baseline),
            "--data",
            str(tmp_path / "oblique.nii.gz"),
            "--out",
            str(tmp_path / "obl"),
            "--tta",
        ],
    )
    assert result.exit_code == 0, result.output
    back = nib.load(tmp_path / "obl" / "predictions" / "oblique.nii.gz")
    assert back.shape == (48, 40, 12)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)


def test_evaluate_checkpoint_scores_a_data_list(baseline: Path, prepared: Path, tmp_path: Path) -> None:
    datalist = prepared / "datalists" / "liver_fold0.json"
    result = CliRunner().invoke(
        app, ["evaluate", "--checkpoint", str(baseline), "--data", str(datalist), "--out", str(tmp_path / "ev")]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["classes"]) == {"liver", "liver_tumor"}
    sections = json.loads(datalist.read_text())
    assert summary["cases"] == len(sections["validation"])  # a fold's list scores its held-out cases
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(baseline),
            "--data",
            str(datalist),
            "--split",
            "all",
            "--out",
            str(tmp_path / "all"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["cases"] == len(sections["training"]) + len(sections["validation"])
    n_cases = summary["cases"]
    assert len(list((tmp_path / "all" / "predictions").glob("*.nii.gz"))) == n_cases
    assert f"{n_cases} of {n_cases} case(s) from the case store" in flat(result.output)
    # The same data list outside its prepared folder goes through the raw files: the same predictions.
    import nibabel as nib

    from freetumor_cli.core.cases import read_datalist

    loose = tmp_path / "elsewhere" / "list.json"
    loose.parent.mkdir()
    loose.write_text(
        json.dumps(
            {"testing": [{**e, "image": str(e["image"]), "label": str(e["label"])} for e in read_datalist(datalist)]}
        )
    )
    result = CliRunner().invoke(
        app, ["evaluate", "--checkpoint", str(baseline), "--data", str(loose), "--out", str(tmp_path / "raw")]
    )
    assert result.exit_code == 0 and "images: raw files" in flat(result.output), result.output
    for stored in (tmp_path / "all" / "predictions").glob("*.nii.gz"):
        a = np.asarray(nib.load(stored).dataobj)
        b = np.asarray(nib.load(tmp_path / "raw" / "predictions" / stored.name).dataobj)
        assert a.shape == b.shape and np.mean(a == b) > 0.999, (stored.name, np.mean(a == b))


class BlasThreadsProbe(torch.utils.data.Dataset):
    """Reports, from inside a data-loader worker, how many threads its BLAS libraries may use."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        from threadpoolctl import threadpool_info

        return max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")


def test_loader_workers_use_one_blas_thread() -> None:
    """Synthesis does matrix products in the workers: a BLAS thread per core in each would oversubscribe."""
    from freetumor_cli.core.training import seed_worker

    loader = torch.utils.data.DataLoader(BlasThreadsProbe(), batch_size=None, num_workers=1, worker_init_fn=seed_worker)
    assert list(loader) == [1, 1]


def test_without_a_matching_store_the_run_reads_raw_files_and_says_how_to_build_one(
    prepared: Path, tmp_path: Path
) -> None:
    tiny = [a if a != "spacing_mm=[4,4,4]" else "spacing_mm=[5,5,5]" for a in TINY]
    args = ["train-seg", "--data", str(prepared), "--out", str(tmp_path / "raw"), "--max-steps", "1", *tiny]
    result = CliRunner().invoke(app, [*args, "--set", "val_every=100"])
    assert result.exit_code == 0, result.output
    assert "no case store at [5.0, 5.0, 5.0] mm" in flat(result.output)
    assert "preprocessing.abdomen_spacing_mm=[5,5,5]" in flat(result.output)
    rows = [json.loads(line) for line in (tmp_path / "raw" / "metrics.jsonl").read_text().splitlines()]
    assert [r["store_share"] for r in rows if "loss" in r] == [0.0]


def test_init_from_a_checkpoint_and_a_mismatched_quality_control_baseline(
    prepared: Path, baseline: Path, tmp_path: Path
) -> None:
    run = tmp_path / "init"
    args = ["train-seg", "--data", str(prepared), "--out", str(run), "--max-steps", "1", "--init", str(baseline), *TINY]
    result = CliRunner().invoke(app, [*args, "--set", "val_every=100"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "init.json").read_text())
    assert report["loaded"] and not report["skipped_shape"] and "tensors loaded" in (run / "run.log").read_text()
    # A quality-control baseline trained on another grid than the run's is refused, naming what differs.
    other = [a if a != "spacing_mm=[4,4,4]" else "spacing_mm=[5,5,5]" for a in TINY]
    args = [
        "train-seg",
        "--data",
        str(prepared),
        "--out",
        str(tmp_path / "qc"),
        "--task",
        "freesyn",
        "--baseline",
        str(baseline),
    ]
    result = CliRunner().invoke(app, [*args, "--max-steps", "1", *other])
    assert result.exit_code == 2 and "trained with spacing_mm (4.0, 4.0, 4.0), this run uses (5.0, 5.0, 5.0)" in flat(
        result.output
    )
