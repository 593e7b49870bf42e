"""Where a model runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked before any work starts."""

from __future__ import annotations

import os
import re

from freetumor_cli.core.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device_name(name: str) -> str:
    """``name`` if it is a device freetumor knows how to use (spelling only; no torch import)."""
    if name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise ConfigError(f"unknown device {name!r}", hint=f"use {DEVICE_CHOICES}")


def resolve_device(name: str = "auto") -> str:
    """The torch device for ``name``: ``auto`` takes the first CUDA GPU when there is one, else the CPU.

    Raises:
        ConfigError: an unknown name, or a CUDA device this machine does not have.
    """
    import torch

    name = check_device_name(name)
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(
            f"--device {name} is not available: this machine has {count} CUDA device(s)",
            hint="use --device cpu" + (f" or cuda:0..cuda:{count - 1}" if count else ""),
        )
    return f"cuda:{index}"


def pin_training_device(name: str) -> bool:
    """Make a training run use device ``name``; returns whether it must run on the CPU.

    Call before anything touches CUDA. ``cuda:N`` restricts the process to GPU N (through
    ``CUDA_VISIBLE_DEVICES``), which only a single-process run can do: with several processes, the
    launcher places them (``accelerate launch --gpu_ids``).
    """
    name = check_device_name(name)
    if name in ("auto", "cuda"):
        return False
    if name == "cpu":
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"--device {name} names one GPU, but this run has {os.environ['WORLD_SIZE']} processes",
            hint="leave --device at auto and choose the GPUs with accelerate launch --gpu_ids",
        )
    index = int(name.partition(":")[2])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    if ids is not None and index >= len(ids):
        raise ConfigError(
            f"--device {name} is not available: CUDA_VISIBLE_DEVICES={visible} shows {len(ids)} GPU(s)",
            hint="use --device cpu" + (f" or cuda:0..cuda:{len(ids) - 1}" if ids else ""),
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids is not None else str(index)  # before CUDA starts
    resolve_device("cuda:0")  # the GPU exists
    return False
