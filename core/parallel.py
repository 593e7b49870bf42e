"""Case-parallel work: worker processes (validation, preprocessing, scoring, synthesis) and job parts."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from freetumor_cli.core.errors import ConfigError

T = TypeVar("T")


def select_part(items: Sequence[T], num_parts: int, part_id: int) -> list[T]:
    """Part ``part_id`` of ``num_parts``: every ``num_parts``-th item, as nnU-Net's predict splits its cases.

    The parts together hold every item exactly once, so a cluster's array jobs can share one list.

    Raises:
        ConfigError: ``num_parts`` below 1, or ``part_id`` outside 0..num_parts-1.
    """
    if num_parts < 1:
        raise ConfigError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise ConfigError(f"--part-id must lie in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    return list(items[part_id::num_parts])


def _one_thread_per_worker() -> None:
    # N workers × all cores each would oversubscribe the machine.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` fresh processes, one compute thread each.

    Workers are spawned, not forked: forking a process that has loaded torch or an OpenMP runtime can
    deadlock, and a library caller may well have.
    """
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread_per_worker
    )
