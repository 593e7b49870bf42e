"""What both training loops share: the run folder, the Accelerator, the data loader, the schedule, metrics
and saved state.

Counts are per process and per optimizer step. With N processes each process sees 1/N of an epoch's
samples (Accelerate shards the loader), so an epoch has ``ceil(batches / grad_accum)`` optimizer steps on
every process, and warm-up and total steps are counted in those. The learning-rate scheduler is stepped
once per optimizer step by the loop itself, not through ``accelerator.prepare`` (a prepared scheduler
steps N times per optimizer step), so the schedule by fraction of training is the same on any number of
processes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from freetumor_cli import __version__
from freetumor_cli.core import PathLike
from freetumor_cli.core.errors import InputError
from freetumor_cli.core.memory import MemoryEstimate, check_fits, is_out_of_memory, out_of_memory
from freetumor_cli.core.outputs import OutputLock, append_line, process_umask, write_error, write_text_atomic

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from freetumor_cli.core.preprocess import Preprocessing
    from freetumor_cli.core.store import CaseSource

log = logging.getLogger("freetumor")


# What a crop may carry into a batch: the crop, its labels, the synthetic tumor and what it replaced.
BATCH_KEYS = (
    "image", "label", "synth_mask", "image_orig", "label_orig", "profile", "organ_index", "sample_index", "from_store",
)  # fmt: skip


def collate_crops(samples: list[Any]) -> dict[str, Any]:
    import torch

    crops = [c for s in samples for c in (s if isinstance(s, list) else [s])]
    keys = [k for k in BATCH_KEYS if k in crops[0]]
    batch: dict[str, Any] = {k: torch.stack([torch.as_tensor(c[k]) for c in crops]) for k in keys}
    # What went wrong while the samples were drawn (replaced samples, damaged store cases), for the run's log.
    batch["incidents"] = [i for c in crops for i in c.get("incidents", ())]
    return batch


def seed_worker(_worker_id: int) -> None:
    """Set up a data-loader worker: one compute thread for torch, numpy's and scipy's BLAS and blosc2.

    Workers run side by side. A forked worker's BLAS would otherwise start a thread per core, and a
    few workers doing matrix products at once then run many times slower than one thread each.
    """
    import blosc2
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")
    blosc2.set_nthreads(1)


def has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def run_lock(out: Path, command: str) -> Iterator[None]:
    """Hold the run folder's lock for the run (the main process does; the others write nothing).

    The rank comes from the launcher's environment: the process group does not exist yet here.
    """
    rank = next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if k in os.environ), "0")
    if rank == "0":
        with OutputLock(out, command):
            yield
    else:
        yield


Run = TypeVar("Run", bound=Callable[..., Any])


def locked_run(command: str) -> Callable[[Run], Run]:
    """Run the decorated training function holding its run folder's lock (:func:`run_lock`); the folder
    is the function's second argument, ``out_dir``."""

    def wrap(function: Run) -> Run:
        @functools.wraps(function)
        def locked(prepared: Any, out_dir: Any, *args: Any, **kwargs: Any) -> Any:
            with run_lock(Path(out_dir), command):
                return function(prepared, out_dir, *args, **kwargs)

        return cast(Run, locked)

    return wrap


STATE, STATE_NEXT, STATE_OLD = "state", "state.next", "state.old"


def saved_state(out: Path) -> Path | None:
    """The run's last complete saved state: ``state/``, or ``state.old/`` when a run was killed between the
    two renames that put a new state in place; None when there is none."""
    for name in (STATE, STATE_OLD):
        if (out / name / "progress.json").is_file():
            return out / name
    return None


def check_run_folder(out: Path, resume: bool) -> None:
    """A new run never replaces an old one; a resume needs a saved state."""
    if any((out / name).exists() for name in (STATE, STATE_OLD)) and not resume:
        raise InputError(f"{out} already holds a run", hint="pass --resume to continue it, or choose another --out")
    if resume and saved_state(out) is None:
        raise InputError(f"nothing to resume in {out} (no saved state)", hint="start the run without --resume")


def make_accelerator(out: Path, *, mixed_precision: str, grad_accum: int = 1, device: str = "auto") -> Accelerator:
    """The run's Accelerator; ``device`` is ``auto`` (what the launcher gives), ``cpu``, or one ``cuda:N``."""
    from freetumor_cli.core.devices import pin_training_device

    on_cpu = pin_training_device(device)  # before torch touches CUDA
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        # Without an accelerator, say so: Accelerate then runs torchrun's processes as gloo CPU workers.
        cpu=on_cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with="tensorboard" if has_tensorboard() else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def fused_update(device: Any) -> bool | None:
    """Whether Adam(W) updates every parameter in one fused kernel: on CPU and CUDA, where PyTorch has
    one (None elsewhere: its default). On 2 CPU cores the per-tensor update of a 5-million-parameter UNet
    costs 0.02-0.07 s a step, the fused one 0.004 s."""
    return True if device.type in ("cpu", "cuda") else None


def match_update_path(optimizer: Any) -> None:
    """After a saved state is loaded: a state saved by a per-tensor optimizer (an earlier version's) makes
    a fused one per-tensor again (its groups carry ``fused=None``); it must then stop telling a gradient
    scaler that it unscales in its own kernel, or an fp16 step fails on its arguments."""
    if not all(group.get("fused") for group in optimizer.param_groups):
        optimizer._step_supports_amp_scaling = False


def make_loader(dataset: Any, *, batch_size: int, workers: int, seed: int) -> DataLoader[Any]:
    """The training loader: shuffled, its workers (if any) alive across epochs, reading the epoch the
    loop sets from shared memory (:meth:`~freetumor_cli.core.seg_data.CropDataset.share_epoch`)."""
    import torch

    if workers > 0 and hasattr(dataset, "share_epoch"):
        dataset.share_epoch()
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_crops,
        worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0,
    )  # fmt: skip


def case_source(prepared: PathLike, preprocessing: Preprocessing) -> CaseSource:
    """The store of ``prepared`` for this preprocessing when it has one, else the raw files."""
    from freetumor_cli.core.store import CaseSource, open_store

    return CaseSource(preprocessing, open_store(prepared, preprocessing))


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps of a run, per process (every process takes the same steps).

    Attributes:
        steps_per_epoch: optimizer steps in one epoch.
        total_steps: steps of the whole run (``max_steps`` when given).
        epochs: epochs the loop starts (the last one may stop early at ``total_steps``).
    """

    steps_per_epoch: int
    total_steps: int
    epochs: int

    @classmethod
    def of(cls, batches_per_epoch: int, *, grad_accum: int, epochs: int, max_steps: int | None) -> Schedule:
        """``batches_per_epoch`` is the length of the prepared (sharded) loader."""
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / grad_accum))
        total = max_steps if max_steps is not None else epochs * steps_per_epoch
        return cls(steps_per_epoch, total, min(epochs, math.ceil(total / steps_per_epoch)))

    def batches_to_skip(self, step: int, epoch: int, grad_accum: int) -> int:
        """Loader batches of ``epoch`` already consumed when the run stopped after ``step`` steps."""
        return max(0, step - epoch * self.steps_per_epoch) * grad_accum


def start_run(
    accelerator: Accelerator,
    out: Path,
    *,
    resume: bool,
    files: Mapping[str, str],
    initial: dict[str, Any],
    tracker: str,
    optimizers: Sequence[Any],
) -> dict[str, Any]:
    """Resume the saved state, or start the run folder: ``files`` (name -> text) are written first.
    ``optimizers``: the prepared ones, whose update path a resume matches to the state it loads
    (:func:`match_update_path`).

    ``metrics.jsonl`` keeps only the rows up to the saved step on a resume (a run killed after its last
    save would otherwise repeat steps), and starts empty on a new run.

    Returns:
        The progress counters (``initial`` on a new run).
    """
    progress = dict(initial)
    if resume:
        progress = _resume_state(accelerator, out, initial, optimizers)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name, text in files.items():
                write_text_atomic(out / name, text)
            (out / "run.log").unlink(missing_ok=True)
        _trim_metrics(out / "metrics.jsonl", int(progress["step"]) if resume else -1)
    what = f"resumed at step {progress['step']}" if resume else "started"
    note(
        accelerator,
        out,
        f"{what} by: {command_line()} (freetumor {__version__}, {accelerator.num_processes} process(es))",
    )
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.init_trackers(tracker)
    return progress


def command_line() -> str:
    """How this process was started, as a shell would read it (a launcher's arguments are not in it)."""
    import shlex
    import sys

    args = list(sys.argv)
    if args and Path(args[0]).name in ("__main__.py", "freetumor"):
        args[0] = "freetumor"
    return shlex.join(args)


def _resume_state(
    accelerator: Accelerator, out: Path, initial: Mapping[str, Any], optimizers: Sequence[Any]
) -> dict[str, Any]:
    """Load the saved state of ``out`` into the prepared objects; a state this run cannot take is an error."""
    hint = "resume with the settings the run started with (its config.yaml), or start a new run in another --out"
    folder = saved_state(out) or out / STATE
    try:
        progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        if not isinstance(progress, dict) or not all(isinstance(progress.get(k), int) for k in ("step", "epoch")):
            raise ValueError("no step and epoch")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot resume from {folder}: progress.json is damaged ({exc})", hint=hint) from None
    try:
        accelerator.load_state(str(folder))
    except Exception as exc:  # torch, safetensors and pickle raise many kinds for damaged or unsafe files
        # Saved tensors are read with weights_only: a file holding code is refused here, not run.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot resume from {folder}: a damaged or unsafe file ({type(exc).__name__}: {first[:200]})", hint=hint
        ) from None
    for optimizer in optimizers:
        match_update_path(optimizer.optimizer)  # the torch optimizer inside Accelerate's wrapper
    return {**initial, **progress}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a line a killed run left half-written (or any line that is not a JSON
    object) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the rows up to ``step`` (none when ``step`` < 0); a torn last line goes too."""
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if step >= 0 and row.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


def note(accelerator: Accelerator, out: Path, message: str) -> None:
    """A line of the run's log: ``run.log`` in the run folder (with the local time) and the ``freetumor``
    logger (main process)."""
    if accelerator.is_main_process:
        append_line(out / "run.log", f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}")
        log.info(message)


def log_metrics(accelerator: Accelerator, out: Path, stats: Mapping[str, Any], step: int) -> None:
    """One row of ``metrics.jsonl`` (and TensorBoard): a value that could not be measured (NaN) is null."""
    if accelerator.log_with:
        scalars = {k: v for k, v in stats.items() if k not in ("epoch", "step") and isinstance(v, int | float)}
        accelerator.log(scalars, step=step)
    if accelerator.is_main_process:
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in stats.items()}
        append_line(out / "metrics.jsonl", json.dumps(row, allow_nan=False))


class StoreFallback:
    """Says once in a run's log when its crops stop coming from the case store (a case gone stale or
    damaged there is read from its raw files, several times slower), naming a case where it can."""

    def __init__(self, source: CaseSource, entries: list[dict[str, Any]]) -> None:
        self.watching = source.store is not None
        self.entries = entries

    def check(self, accelerator: Accelerator, out: Path, store_share: float, raw: Mapping[str, Any], step: int) -> None:
        """``store_share``: this step's share of crops from the store, over all processes."""
        if not self.watching or store_share >= 1.0:
            return
        self.watching = False
        local = [
            int(i) for i, s in zip(raw["sample_index"].flatten(), raw["from_store"].flatten(), strict=True) if not s
        ]
        named = ""
        if local:
            entry = self.entries[local[0]]
            named = f" ({entry.get('dataset', '')}/{entry.get('case', '')} among them)"
        note(
            accelerator,
            out,
            f"step {step}: {1 - store_share:.0%} of the crops came from raw files, not the case store{named}: "
            "a case missing, stale or damaged there is decoded and resampled each time (slower); the next "
            "freetumor prepare rebuilds it",
        )


def save_training_state(accelerator: Accelerator, out: Path, progress: dict[str, Any]) -> None:
    """Save what ``--resume`` needs, so that a run killed at any moment leaves one complete state.

    The state is written into ``state.next/`` (``progress.json`` last), then renamed into place:
    ``state/`` becomes ``state.old/``, ``state.next/`` becomes ``state/``, and ``state.old/`` goes. A run
    killed before the renames resumes from the previous state; between them, from ``state.old/``.
    """
    import shutil

    final, staging, old = out / STATE, out / STATE_NEXT, out / STATE_OLD
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            _follow_umask(staging.glob("*.safetensors"))  # safetensors makes its files private
            write_text_atomic(staging / "progress.json", json.dumps(progress) + "\n")
    except BaseException as exc:
        error = write_error(staging, exc)  # before the cleanup frees the space it would look for
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # half a state is no state
        if error is None:
            raise
        raise error from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _follow_umask(paths: Iterable[Path]) -> None:
    mode = 0o666 & ~process_umask()
    for path in paths:
        os.chmod(path, mode)


def check_step_fits(accelerator: Accelerator, need_for: Callable[[str], MemoryEstimate], *, suggestion: str) -> None:
    """Refuse to start a run whose step would not fit in memory (each process checks its own device)."""
    device = str(accelerator.device)
    if device == "cuda":
        device = f"cuda:{accelerator.device.index or 0}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    check_fits(need_for(device), processes_per_host=local, suggestion=suggestion)


@contextmanager
def out_of_memory_is_an_error(out: Path, device: Any, current_step: Callable[[], int]) -> Iterator[None]:
    """Turn running out of memory in a step into a one-line error naming the state kept for --resume."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        folder = saved_state(out)
        try:
            saved = int(json.loads((folder / "progress.json").read_text(encoding="utf-8"))["step"]) if folder else None
        except (OSError, ValueError, KeyError):
            saved = None
        raise out_of_memory(current_step(), saved, str(device)) from None


def gathered_sum(accelerator: Accelerator, *values: float) -> list[float]:
    """Each value summed over all processes (every process gets the sums)."""
    import torch

    tensor = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    return [float(v) for v in accelerator.reduce(tensor, reduction="sum")[0].tolist()]


def record_incidents(
    accelerator: Accelerator, out: Path, incidents: list[dict[str, Any]], progress: dict[str, Any]
) -> None:
    """Write what went wrong while this step's samples were drawn, on any process, to ``run.log``, and count
    the samples replaced in ``progress["bad_samples"]`` (every process calls this at every step)."""
    from accelerate.utils import gather_object

    bad, reported = gathered_sum(accelerator, sum(i["kind"] == "bad_sample" for i in incidents), len(incidents))
    progress["bad_samples"] = int(progress.get("bad_samples", 0)) + int(bad)
    if not reported:
        return
    for incident in gather_object(incidents) if accelerator.num_processes > 1 else incidents:
        if incident["kind"] == "bad_sample":
            note(
                accelerator, out,
                f"sample {incident['sample']} of epoch {incident['epoch']}: case {incident['case']} "
                f"(seed {incident['seed']}) raised {incident['error']}; drawn again from the next case",
            )  # fmt: skip
        else:
            note(accelerator, out, f"case store: {incident['case']}: {incident['error']}")


def gathered_list(accelerator: Accelerator, values: Any) -> list[Any]:
    """A 1D tensor of each process, concatenated in process order (for logs: sample indices...)."""
    return [v for v in accelerator.gather(values.reshape(-1)).tolist()]


def version_header(command: str) -> str:
    return f"# freetumor {__version__} {command}\n"
