"""Validation and held-out scoring on N processes compute what one process computes, and never hang.

The same script runs once as one process and once as two gloo processes under torchrun, on networks
with batch-norm buffers (a DDP forward would broadcast them: a collective that hangs when a process has
no case, and pairs wrongly when the shares differ), for 1 and 3 cases (shares that 2 does not divide).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import prepare_phantom_root

pytest.importorskip("monai")
pytest.importorskip("torch")

TIMEOUT = 240  # seconds; one process takes about 5

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    from freetumor_cli.core.checkpoints import trained_channels
    from freetumor_cli.core.gan import GanConfig, make_generator
    from freetumor_cli.core.models import ModelConfig
    from freetumor_cli.core.preprocess import Preprocessing
    from freetumor_cli.core.seg_data import Pipeline, read_task_datalist
    from freetumor_cli.core.train_seg import TrainSegConfig, validation_dice
    from freetumor_cli.core.train_synth import TrainSynthConfig, gan_batch, _heldout_batch, score_heldout
    from freetumor_cli.core.training import case_source

    prepared, out = Path(sys.argv[1]), Path(sys.argv[2])
    accelerator = Accelerator(cpu=True)

    def network(out_channels):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
            torch.nn.Conv3d(4, out_channels, 1),
        )
        with torch.no_grad():
            net[-1].bias[2] += 1.0  # calls tumor in part of each case: Dice neither 0 nor 1
        return net

    def train_once(model, optimizer):
        # A training forward and backward on the same crops everywhere, as a run does before it validates.
        model.train()
        x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
        accelerator.backward(model(x).float().mean())
        optimizer.zero_grad()

    pp = Preprocessing.for_region("abdomen", spacing_mm=(4.0, 4.0, 4.0))
    source = case_source(prepared, pp)
    lists = read_task_datalist(prepared, "all", 0)
    every = lists["validation"] + lists["training"]
    cases = sorted(every, key=lambda e: e.get("role") != "tumor-labelled")  # cases with tumors first
    result = {}

    model = network(7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_once(model, optimizer)
    seg = TrainSegConfig(task="all", model="unet-tiny", roi=(32, 32, 32), spacing_mm=(4.0, 4.0, 4.0), workers=0)
    for n in (1, 3):
        result[f"val_{n}"] = validation_dice(model, cases[:n], source, seg, (32, 32, 32), accelerator)

    generator = make_generator(GanConfig(region="abdomen", base_channels=4))
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.0)
    generator, opt_g = accelerator.prepare(generator, opt_g)
    critic = network(7).eval()
    critic_config = ModelConfig(
        name="unet-tiny", out_channels=7, roi=(32, 32, 32), task="all",
        preprocessing=Preprocessing.for_region("abdomen", spacing_mm=(4.0, 4.0, 4.0)),
    )
    synth = TrainSynthConfig(base_channels=4, roi=(32, 32, 32), workers=0, crops_per_volume=2)
    pipeline = Pipeline(task="all", preprocessing=pp, roi=(32, 32, 32), crops_per_volume=2, geometry_only=True)
    for n in (1, 3):
        train_once(generator, opt_g)
        config = TrainSynthConfig(base_channels=4, roi=(32, 32, 32), workers=0, crops_per_volume=2, heldout_crops=2 * n)
        fixed = _heldout_batch(cases[::-1][:n], source, pipeline, config, accelerator.device)  # organ-only first
        batch = gan_batch(fixed, critic_config, "all", trained_channels("all"))
        _, scores = score_heldout(accelerator.unwrap_model(generator), batch, critic, config, 425.0)
        result[f"heldout_{n}"] = scores
        result[f"heldout_{n}_crops"] = int(batch.image.shape[0])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.write_text(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_phantom_root(tmp_path_factory)


def run(script: Path, prepared: Path, out: Path, processes: int) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    try:
        done = subprocess.run(
            [*launcher, str(script), str(prepared), str(out)], env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-9", "-f", str(script)], check=False)
        raise AssertionError(f"{processes} processes did not finish in {TIMEOUT} s: a collective hangs") from None
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_validation_and_heldout_scores_on_two_processes_equal_one(prepared: Path, tmp_path: Path) -> None:
    script = tmp_path / "evaluate_on_n.py"
    script.write_text(SCRIPT)
    one = run(script, prepared, tmp_path / "one.json", 1)
    two = run(script, prepared, tmp_path / "two.json", 2)
    for n in (1, 3):
        assert 0.0 < one[f"val_{n}"] < 1.0, one  # a score that can differ
        assert two[f"val_{n}"] == pytest.approx(one[f"val_{n}"], abs=1e-9), (n, one, two)
        assert one[f"heldout_{n}_crops"] == two[f"heldout_{n}_crops"] == 2 * n
        assert set(one[f"heldout_{n}"]) == {"qc_pass_rate", "critic_tumor_prob", "hu_contrast", "halo"}
        for key, value in one[f"heldout_{n}"].items():
            assert two[f"heldout_{n}"][key] == pytest.approx(value, abs=1e-6), (n, key)
