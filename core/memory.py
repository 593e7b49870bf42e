"""Will a training run fit? The peak memory of a step, estimated before the run starts.

A training step holds the weights, their gradients and the optimizer's moments (known from the parameter
count), plus the activations the backward pass needs, which grow with the voxels of a batch. The
activations are ``bytes per voxel × voxels per crop × crops per step`` with one coefficient per network,
measured on CPU by ``benchmarks/bench_memory.py`` (which prints measured against estimated peaks):

==========================  ======================  ===============================
network                     bytes / voxel / crop    measured (2 crops − 1 crop, 64³)
==========================  ======================  ===============================
SwinUNETR v2, feature 48    7,900                   1.93 GiB per crop
UNet 16..256                350                     0.31 GiB per 96³ crop
UNet 8..32 (``unet-tiny``)  290                     0.25 GiB per 96³ crop
generator + discriminator   7,930 at base 32        1.94 GiB per crop
frozen critic in a GAN step 0.73 × its training     1.41 GiB per crop (SwinUNETR)
==========================  ======================  ===============================

SwinUNETR scales with its feature size, the GAN pair with its base channels. Mixed precision keeps
activations in 16 bits: 0.6 of the fp32 figure is assumed. On a GPU the same coefficients are used;
CUDA's allocator and cuDNN's workspaces add a margin that :data:`CUDA_RESERVE` covers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freetumor_cli.core.errors import FreetumorError

GiB = 2**30

ACTIVATION_BYTES_PER_VOXEL = {"swinunetr": 7_900.0, "unet": 350.0, "unet-tiny": 290.0}
GAN_BYTES_PER_VOXEL_AT_BASE_32 = 7_930.0
CRITIC_FRACTION = 0.73  # a frozen critic keeps what the gradient to its input needs, not its weights' gradients
MIXED_PRECISION_FACTOR = 0.6
PROCESS_BYTES = int(0.7 * GiB)  # torch, MONAI and the interpreter in the training process
WORKER_BYTES = int(0.6 * GiB)  # a data loader worker: its imports and a case being cropped
CUDA_RESERVE = int(1.0 * GiB)  # the CUDA context, the caching allocator's slack, cuDNN workspaces
HEADROOM = 0.9  # use at most this share of what is free


class ResourceError(FreetumorError):
    """The machine cannot run what was asked (too little memory)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak of one training step.

    Attributes:
        device: where the step runs (``cpu`` or ``cuda:N``).
        device_bytes: what the step holds on ``device`` (the whole step, on a CPU).
        host_bytes: what the process and its data loader workers hold in RAM besides (GPU runs).
        parts: the terms of the estimate, by name, in bytes.
    """

    device: str
    device_bytes: int
    host_bytes: int
    parts: dict[str, int]

    def describe(self) -> str:
        terms = ", ".join(f"{name} {value / GiB:.1f}" for name, value in self.parts.items())
        return f"about {self.device_bytes / GiB:.1f} GiB on {self.device} ({terms} GiB)"


def parameter_count(module: Any) -> int:
    return sum(int(p.numel()) for p in module.parameters())


def voxels(roi: tuple[int, int, int]) -> int:
    return int(roi[0]) * int(roi[1]) * int(roi[2])


def activation_bytes(model: str, roi: tuple[int, int, int], *, feature_size: int = 48) -> float:
    """What the backward pass of ``model`` keeps for one crop of ``roi`` voxels (fp32)."""
    per_voxel = ACTIVATION_BYTES_PER_VOXEL[model]
    if model == "swinunetr":
        per_voxel *= feature_size / 48
    return per_voxel * voxels(roi)


def estimate(
    *,
    device: str,
    crops_per_step: int,
    activation_per_crop: float,
    trained_parameters: int,
    frozen_parameters: int = 0,
    mixed_precision: str = "no",
    workers: int = 0,
) -> MemoryEstimate:
    """The peak of a step that trains ``trained_parameters`` with Adam(W) on ``crops_per_step`` crops."""
    factor = MIXED_PRECISION_FACTOR if mixed_precision in ("fp16", "bf16") else 1.0
    parts = {
        "activations": int(activation_per_crop * crops_per_step * factor),
        "weights and optimizer": 16 * trained_parameters + 4 * frozen_parameters,  # weights, grads, 2 moments
    }
    host = {"process": PROCESS_BYTES, "loader workers": WORKER_BYTES * workers}
    if device.startswith("cuda"):
        parts["CUDA reserve"] = CUDA_RESERVE
        return MemoryEstimate(device, sum(parts.values()), sum(host.values()), parts)
    parts |= host
    return MemoryEstimate(device, sum(parts.values()), 0, parts)


def _cgroup_available() -> int | None:
    """What the container's memory limit leaves (cgroup v2, then v1), or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:
            return None
        return max(int(limit) - usage, 0)
    return None


def host_available() -> int:
    """RAM this process can still take: the system's available memory, within the container's limit."""
    import psutil

    available = int(psutil.virtual_memory().available)
    limited = _cgroup_available()
    return min(available, limited) if limited is not None else available


def device_available(device: str) -> int:
    """Free bytes on ``device``: RAM for ``cpu``, the GPU's free memory for ``cuda:N``."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return host_available()


def check_fits(need: MemoryEstimate, *, processes_per_host: int = 1, suggestion: str) -> None:
    """Refuse a run whose estimated peak exceeds what is free, with the estimate and what to change.

    ``processes_per_host`` CPU processes share one machine's RAM (a GPU process has its own device).
    Set ``FREETUMOR_SKIP_MEMORY_CHECK=1`` to start anyway.
    """
    if os.environ.get("FREETUMOR_SKIP_MEMORY_CHECK") == "1":
        return
    on_gpu = need.device.startswith("cuda")
    shares = 1 if on_gpu else processes_per_host
    free = device_available(need.device)
    if need.device_bytes * shares > HEADROOM * free:
        where = need.device if on_gpu else "this machine"
        raise ResourceError(
            f"a training step needs {need.describe()}"
            + (f" per process, {processes_per_host} processes" if shares > 1 else "")
            + f"; {where} has {free / GiB:.1f} GiB free",
            hint=f"{suggestion}; or set FREETUMOR_SKIP_MEMORY_CHECK=1 to start anyway",
        )
    if on_gpu and need.host_bytes * processes_per_host > HEADROOM * host_available():
        raise ResourceError(
            f"the data loading needs about {need.host_bytes * processes_per_host / GiB:.1f} GiB of RAM; "
            f"{host_available() / GiB:.1f} GiB is free",
            hint="lower --workers; or set FREETUMOR_SKIP_MEMORY_CHECK=1 to start anyway",
        )


def out_of_memory(step: int, saved_step: int | None, device: str) -> ResourceError:
    """The one-line error for a step that ran out of memory."""
    kept = f"the state saved at step {saved_step} is kept" if saved_step else "no state had been saved yet"
    return ResourceError(
        f"ran out of memory on {device} at step {step}; {kept}",
        hint="use fewer or smaller crops, --model unet, --mixed-precision bf16 or a larger GPU, then --resume",
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's out-of-memory (CUDA or MPS), or a CPU allocation that failed."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
