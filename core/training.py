"""Pieces every training loop shares: batching crops, worker setup, metrics and state on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from freetumor_cli.core.io import write_text_atomic


def collate_crops(samples: list[Any]) -> dict[str, Any]:
    import torch

    crops = [c for s in samples for c in (s if isinstance(s, list) else [s])]
    keys = [k for k in ("image", "label", "synth_mask", "image_orig", "profile", "organ_index") if k in crops[0]]
    return {k: torch.stack([torch.as_tensor(c[k]) for c in crops]) for k in keys}


def seed_worker(_worker_id: int) -> None:
    """Set up a data-loader worker: one compute thread for torch and one for numpy's and scipy's BLAS.

    Workers run side by side. A forked worker's BLAS would otherwise start a thread per core, and a
    few workers doing matrix products at once then run many times slower than one thread each.
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")


def has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def log_metrics(accelerator: Any, out: Path, stats: dict[str, float], step: int) -> None:
    if accelerator.log_with:
        accelerator.log({k: v for k, v in stats.items() if k not in ("epoch", "step")}, step=step)
    if accelerator.is_main_process:
        with (out / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(stats) + "\n")


def save_training_state(accelerator: Any, out: Path, progress: dict[str, Any]) -> None:
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out / "state"))
    if accelerator.is_main_process:
        write_text_atomic(out / "state" / "progress.json", json.dumps(progress) + "\n")
    accelerator.wait_for_everyone()
