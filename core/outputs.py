"""Safe outputs: atomic writes with the umask's permissions, one-line write errors, the output-folder lock and
the sweep of what killed runs left behind.

Every file freetumor writes goes through :func:`atomic_path` (a temporary name beside the target, renamed into
place), so an interrupted run never leaves a half-written file under a final name; temporary names carry
their owner (host and process), which lets :func:`sweep_stale` tell a killed run's leftovers from a write in
progress.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from freetumor_cli.core import PathLike
from freetumor_cli.core.errors import InputError, OutputBusyError, OutputError


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` on success.

    The file gets the permissions the user's umask gives new files (``mkstemp`` makes them private, and so
    do writers that create their own file, such as safetensors).
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{temp_prefix(path.name)}", suffix=f".tmp{suffix}", dir=path.parent)
        os.fchmod(fd, 0o666 & ~process_umask())
        os.close(fd)
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:
            raise output_error(path, exc) from None
        raise
    tmp = Path(tmp_name)
    try:
        yield tmp
        # After the writer: one that replaces the file (safetensors does) leaves a private one behind.
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            raise output_error(path, exc) from None
        raise


TEMP_PREFIX = ".ft-"  # temporary files of atomic writes; remove_stale_temporaries knows them by it


STALE_SECONDS = 3600


def owner_tag() -> str:
    """``<host>.<pid>`` of this process, for temporary names: a later run can then tell the leftovers of a
    killed process (gone) from a write in progress (alive)."""
    return f"{_host()}.{os.getpid()}"


def _host() -> str:
    import socket

    return socket.gethostname().replace(".", "_")[:32] or "host"


def temp_prefix(name: str) -> str:
    """The start of a temporary name for ``name`` (:data:`TEMP_PREFIX`, the name, the owner); the name is cut
    to 100 characters, so a temporary name is never longer than the file system allows where ``name`` fits."""
    return f"{TEMP_PREFIX}{name[:100]}.{owner_tag()}."


def owner_is_gone(name: str) -> bool:
    """Whether a temporary name made by :func:`temp_prefix` (or the store's) belongs to a process of this host
    that no longer runs. Names of other hosts, or without an owner, are not judged (False)."""
    host = _host()
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == host and parts[i + 1].isdigit():
            pid = int(parts[i + 1])
            if pid == os.getpid():
                return False
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except OSError:  # alive, owned by someone else
                return False
            return False
    return False


# The errors of writing a file that are the place's fault, not the program's: each is one line (exit 4).
WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose another --out, then rerun"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose another --out, then rerun"),
    errno.EFBIG: ("the file is too large for the file system", "choose another --out"),
    errno.EROFS: ("the file system is read-only", "choose a folder you can write to"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.ENAMETOOLONG: ("the file name is too long", "use shorter case names or a shorter --out path"),
    errno.EIO: ("an input/output error of the device", "check the disk, then rerun"),
}


def output_error(path: PathLike, exc: OSError) -> OutputError:
    """The one-line error for an :class:`OSError` met while writing ``path``: the real cause, and what to do."""
    reason, hint = WRITE_ERRORS.get(exc.errno or 0, (exc.strerror or type(exc).__name__, "check the output folder"))
    return OutputError(f"cannot write {path}: {reason}", hint=f"{hint}; finished outputs are kept")


def check_name_lengths(paths: Sequence[Path]) -> None:
    """Refuse output names longer than their file system allows, before anything is written.

    Raises:
        OutputError: naming the first such path.
    """
    for path in paths:
        folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
        try:
            limit = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        if len(path.name.encode()) > limit:
            raise output_error(path, OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)))


def _device_is_full(path: Path) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has less than 1 MiB free."""
    import shutil

    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return folder is not None and shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def write_error(path: PathLike, exc: BaseException) -> OutputError | None:
    """The one-line error of a failed write, when the place is at fault (a full disk, a read-only folder):
    from an :class:`OSError`, or from a library that reports the system's error in its message only
    (safetensors: "... (os error 28)"). None when ``exc`` is not such an error."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code is None and _device_is_full(Path(path)):  # torch.save says only "unexpected pos"
        code = errno.ENOSPC
    if code not in WRITE_ERRORS:
        return None
    return output_error(path, exc if isinstance(exc, OSError) else OSError(code, os.strerror(code)))


def write_safetensors(tensors: Mapping[str, Any], path: PathLike) -> Path:
    """Write tensors as a ``.safetensors`` file atomically, with the umask's permissions.

    Serialized in memory and written by Python: safetensors' own writer makes its files private (0600)
    and reports a full disk as its own error type.
    """
    from safetensors.torch import save

    path = Path(path)
    data = save(dict(tensors))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def process_umask() -> int:
    """This process's umask (read without changing it where the system tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, then restore it at once
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: PathLike, *, older_than: float = STALE_SECONDS) -> int:
    """Remove temporary files of atomic writes that a killed run left in ``folder`` (and below); returns how many.

    A file goes when the process that wrote it is gone (it names its host and process), or when it is
    older than ``older_than`` seconds: a write in progress is never touched.
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    return sweep_stale((p for p in root.rglob(f"{TEMP_PREFIX}*") if ".tmp" in p.name and p.is_file()), older_than)


def sweep_stale(paths: Iterable[Path], older_than: float = STALE_SECONDS) -> int:
    """Remove those of ``paths`` (temporary files or folders with an owner in their name, :func:`temp_prefix`)
    whose owner is gone or that are older than ``older_than`` seconds; returns how many went."""
    import shutil
    import time

    cutoff = time.time() - older_than
    removed = 0
    for path in paths:
        try:
            if not (path.stat().st_mtime < cutoff or owner_is_gone(path.name)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def writable_folder(path: PathLike, *, what: str = "--out") -> Path:
    """``path`` as an output folder: created if needed; an existing file is a usage error, a place that
    cannot be written (read-only, full, no permission) an environment error that names the cause."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder", hint="choose a folder for the outputs")
    for action, attempt in (("create", _make_folder), ("write to", _probe_write)):
        try:
            attempt(folder)
        except OSError as exc:
            reason, hint = WRITE_ERRORS.get(exc.errno or 0, (exc.strerror or type(exc).__name__, "choose a folder"))
            raise OutputError(f"cannot {action} {what} {folder}: {reason}", hint=hint) from None
    return folder


def _make_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)


def _probe_write(folder: Path) -> None:
    """Write and remove a file: the only test that tells a read-only mount, a full disk or a missing
    permission apart (root passes permission checks that the file system still refuses)."""
    with tempfile.NamedTemporaryFile(prefix=temp_prefix("probe"), suffix=".tmp", dir=folder):
        pass


class OutputLock:
    """Lock ``folder`` while a command writes into it: a second run into the same folder stops at once with
    an error instead of replacing the first one's files.

    The lock is on the folder itself (``flock``), released when the run ends or dies; while it is held,
    ``.freetumor.lock`` in the folder names the run holding it. Entering it also removes what killed runs
    left there (:func:`remove_stale_temporaries`). A folder the lock created is removed again if the run
    wrote nothing into it, so a run refused for bad input leaves no trace.
    """

    NAME = ".freetumor.lock"

    def __init__(self, folder: PathLike, command: str, *, part: tuple[int, int] | None = None) -> None:
        self.folder = Path(folder)
        self.command = command
        self.part = part  # (part id, number of parts): parts of one job share the folder, each locks its own
        self._fd: int | None = None
        self._created = False

    @property
    def _name(self) -> str:
        return self.NAME if self.part is None else f"{self.NAME}.part-{self.part[0]}-of-{self.part[1]}"

    def __enter__(self) -> OutputLock:
        import fcntl

        self._created = not self.folder.exists()
        writable_folder(self.folder)
        if self.part is None:
            fd = os.open(self.folder, os.O_RDONLY)
        else:
            fd = os.open(self.folder / self._name, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                holder = (self.folder / self._name).read_text(encoding="utf-8").strip()
            except OSError:
                holder = "another freetumor run"
            raise OutputBusyError(
                f"{self.folder} is in use by {holder}", hint="wait for it to finish, or choose another --out"
            ) from None
        self._fd = fd
        (self.folder / self._name).write_text(f"freetumor {self.command} (pid {os.getpid()})\n", encoding="utf-8")
        # Nobody else writes here now, unless other parts of the same job do: then only old leftovers go.
        remove_stale_temporaries(self.folder, **({"older_than": 0} if self.part is None else {}))
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            (self.folder / self._name).unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if self._created:
                with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                    self.folder.rmdir()


def append_line(path: PathLike, line: str) -> None:
    """Append one line to a log (its folder made if needed); a full disk is a one-line :class:`OutputError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:
            raise output_error(path, exc) from None
        raise


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
