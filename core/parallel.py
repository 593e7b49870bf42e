"""Worker processes for case-parallel work (validation, preprocessing, scoring)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


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
