"""Download organ labels from the Hugging Face dataset ``Luffy503/FreeTumor`` into a data root.

The repository's layout is discovered from its file listing: top-level folders are mapped to dataset
names (:mod:`freetumor_cli.core.datasets`), files are mirrored under ``--dest`` at their repository path,
and anything not understood is reported. Paths that would leave ``--dest`` are refused.

The endpoint is read from ``HF_ENDPOINT`` at call time (``huggingface_hub`` reads it only at import) and
passed explicitly; ``HF_HUB_OFFLINE`` is honoured the same way. After a complete download a record,
``.freetumor_fetch.json``, lists every file with its size, so an offline run can tell a complete local
copy from an incomplete one.

Every request goes through ``huggingface_hub``'s shared HTTP session with a timeout (``--timeout``, else
``$FREETUMOR_HUB_TIMEOUT``, else 30 s) on connecting and on each read, so a hub that stops answering
ends the run with one line. A file is transferred in chunks into a partial file beside its final name
(``.<name>.<hash>.part``), which a rerun resumes with an HTTP ``Range`` request; it is checked against
the hub's size and hash and only then renamed into place. Transfers run on daemon threads and check a
stop flag between chunks while the calling thread only waits, so Ctrl-C and SIGTERM stop a run at once
(``hf_hub_download`` in a thread pool cannot be stopped before its file is complete).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from freetumor_cli.core import PathLike
from freetumor_cli.core.archives import archive_name, archive_stem, check_parts, extract_archive
from freetumor_cli.core.datasets import canonical_dataset
from freetumor_cli.core.errors import ConfigError, FreetumorError, InputError, OutputBusyError, OutputError
from freetumor_cli.core.outputs import write_text_atomic

DEFAULT_REPO = "Luffy503/FreeTumor"
DEFAULT_ENDPOINT = "https://huggingface.co"
RECORD_NAME = ".freetumor_fetch.json"
TIMEOUT_VARIABLE = "FREETUMOR_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 16  # a transfer checks its stop flag, and its partial file grows, every 64 KB
PARTIAL_SUFFIX = ".part"
T = TypeVar("T")
R = TypeVar("R")


class HubError(FreetumorError):
    """The hub could not be reached, stopped answering, failed, or refused the request."""


@dataclass(frozen=True)
class RemoteFile:
    """A file of a hub repository.

    Attributes:
        path: its path in the repository.
        size: its size in bytes, as the hub lists it.
        dataset: the registry dataset it belongs to (None when not understood).
        sha256: the content's sha256 (the hub gives it for LFS files), or None.
        blob_id: the git blob id (sha1 of ``blob <size>\\0`` + content; for files not in LFS), or None.
    """

    path: str
    size: int
    dataset: str | None
    sha256: str | None = None
    blob_id: str | None = None
    archive: str | None = None

    def digest(self) -> str | None:
        """The hub's content hash of the file (sha256, else the git blob id), or None."""
        return self.sha256 or self.blob_id


@dataclass
class Listing:
    """A repository's files at one commit, sorted into datasets."""

    repo: str
    revision: str
    commit: str
    files: list[RemoteFile] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)

    def by_dataset(self) -> dict[str | None, list[RemoteFile]]:
        groups: dict[str | None, list[RemoteFile]] = {}
        for f in self.files:
            groups.setdefault(f.dataset, []).append(f)
        return groups

    def archives(self) -> dict[str, list[RemoteFile]]:
        """Archive name -> its file(s), parts in order."""
        groups: dict[str, list[RemoteFile]] = {}
        for f in self.files:
            if f.archive is not None:
                groups.setdefault(f.archive, []).append(f)
        return {k: sorted(v, key=lambda f: f.path) for k, v in sorted(groups.items())}


@dataclass
class FetchResult:
    dest: Path
    commit: str
    downloaded: list[RemoteFile] = field(default_factory=list)
    up_to_date: list[RemoteFile] = field(default_factory=list)
    extracted: dict[str, int] = field(default_factory=dict)  # archive -> files it put under dest
    unknown: list[RemoteFile] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    offline: bool = False
    notes: list[str] = field(default_factory=list)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def safe_relative_path(path: str) -> PurePosixPath | None:
    """``path`` as a relative POSIX path that stays inside its destination, or None if it would not."""
    if not path or "\\" in path or "\x00" in path or path.startswith("/"):
        return None
    parts = PurePosixPath(path).parts
    if any(p in ("", ".", "..") for p in parts) or (parts and ":" in parts[0]):
        return None
    return PurePosixPath(*parts)


def _inside(dest: Path, relative: PurePosixPath) -> bool:
    root = dest.resolve()
    target = (root / Path(*relative.parts)).resolve()
    return target == root or root in target.parents


def hub_timeout(timeout: float | None = None) -> float:
    """Seconds each network call may wait (to connect, and for each read): ``timeout``, else
    ``$FREETUMOR_HUB_TIMEOUT``, else 30.

    Raises:
        ConfigError: not a positive number of seconds.
    """
    if timeout is None:
        text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
        if not text:
            return DEFAULT_TIMEOUT_S
        try:
            timeout = float(text)
        except ValueError:
            raise ConfigError(f"{TIMEOUT_VARIABLE}={text!r} is not a number of seconds") from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"the hub timeout must be a positive number of seconds, not {timeout}")
    return float(timeout)


@dataclass(frozen=True)
class HubClient:
    """How a run reaches the hub: its endpoint, the token, and the timeout of every network call.

    Requests go through ``huggingface_hub``'s shared session (its proxies, user agent and hooks), with the
    timeout given per request: the session's own default is to wait for ever.
    """

    endpoint: str
    token: str | None
    timeout: float

    @classmethod
    def from_environment(cls, token: str | None = None, timeout: float | None = None) -> HubClient:
        """``HF_ENDPOINT``, ``token`` (else ``HF_TOKEN``) and :func:`hub_timeout`, read now."""
        return cls(hub_endpoint(), token or os.environ.get("HF_TOKEN") or None, hub_timeout(timeout))

    def headers(self) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        from freetumor_cli import __version__

        return dict(build_hf_headers(token=self.token, library_name="freetumor", library_version=__version__))

    def get_json(self, url: str, *, params: dict[str, Any] | None = None) -> tuple[Any, str | None]:
        """GET ``url``: its JSON body and the next page's address (the ``Link`` header), or None.

        Raises whatever the session or ``hf_raise_for_status`` raise; :meth:`failure` says it in a line.
        """
        from huggingface_hub import get_session
        from huggingface_hub.utils import hf_raise_for_status

        response = get_session().get(url, params=params, headers=self.headers(), timeout=self.timeout)
        hf_raise_for_status(response)
        return response.json(), response.links.get("next", {}).get("url")

    def failure(self, exc: Exception, *, doing: str, url: str, repo: str, repo_type: str = "dataset") -> HubError:
        """The one-line error for a failed request, ``doing`` what (``listing …``, ``downloading FILE``)."""
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
        resumes = "finished files are kept and a partial one resumes where it stopped"
        if isinstance(exc, RepositoryNotFoundError | GatedRepoError):
            return HubError(
                f"{repo_type} repository {repo!r} not found or not accessible at {self.endpoint}",
                hint="check --repo, and set HF_TOKEN or --token if it is gated",
            )
        if isinstance(exc, RevisionNotFoundError):
            return HubError(f"revision not found in {repo!r} at {self.endpoint}", hint="check --revision")
        if isinstance(exc, RemoteEntryNotFoundError):
            return HubError(
                f"the hub at {self.endpoint} does not have the file, {doing} ({url})",
                hint="the repository changed since it was listed: rerun",
            )
        if isinstance(exc, httpx2.TimeoutException):
            return HubError(
                f"the hub at {self.endpoint} did not answer within {self.timeout:g} s, {doing} ({url})",
                hint=f"check the network, or allow more time with --timeout SECONDS (or {TIMEOUT_VARIABLE}); {resumes}",
            )
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            return HubError(
                f"the hub at {self.endpoint} answered HTTP {exc.response.status_code}, {doing} ({url})",
                hint=f"the hub has a problem: rerun later; {resumes}",
            )
        if isinstance(exc, httpx2.TransportError) and not isinstance(exc, httpx2.ConnectError):
            return HubError(
                f"the connection to the hub at {self.endpoint} broke off, {doing} ({detail})",
                hint=f"rerun: {resumes}",
            )
        if isinstance(exc, ValueError | KeyError | TypeError | AttributeError):  # not the JSON the hub sends
            return HubError(
                f"the hub at {self.endpoint} answered something that is not its API, {doing} ({url})",
                hint="check HF_ENDPOINT",
            )
        if hub_offline():
            return HubError(
                f"HF_HUB_OFFLINE is set, and this needs the hub at {self.endpoint}",
                hint="unset HF_HUB_OFFLINE to download, or place the files under --dest by hand",
            )
        return HubError(
            f"cannot reach the Hugging Face hub at {self.endpoint} ({detail})",
            hint="check the network or HF_ENDPOINT; offline, set HF_HUB_OFFLINE=1 to use a complete local copy, "
            "or place the files under --dest by hand",
        )


def cannot_write(folder: Path, exc: OSError, *, option: str = "--dest") -> OutputError:
    """A local write failed: said as the folder's fault (full, read-only, not writable), not the hub's."""
    from freetumor_cli.core.outputs import WRITE_ERRORS

    reason = WRITE_ERRORS.get(exc.errno or 0, (os.strerror(exc.errno) if exc.errno else str(exc), ""))[0]
    return OutputError(
        f"cannot write in {folder}: {reason}",
        hint=f"free some space or choose a folder you can write to ({option}), then rerun: finished files are kept",
    )


def list_remote(
    repo: str = DEFAULT_REPO,
    *,
    revision: str = "main",
    token: str | None = None,
    repo_type: str = "dataset",
    timeout: float | None = None,
) -> Listing:
    """List a repository's files at ``revision`` (with their sizes and hashes) and sort them into datasets.

    The revision is resolved to its commit first and the listing read at that commit, page by page.

    Raises:
        HubError: the hub unreachable, silent for longer than the timeout, or refusing the request.
    """
    from urllib.parse import quote

    from huggingface_hub.hf_api import RepoFile

    client = HubClient.from_environment(token, timeout)
    api = f"{client.endpoint}/api/{repo_type}s/{repo}"
    url = f"{api}/revision/{quote(revision, safe='')}"
    doing = f"listing the {repo_type} repository {repo}"
    try:
        with sigterm_interrupts():
            info, _ = client.get_json(url)
            commit = str(info.get("sha") or revision)
            url = f"{api}/tree/{quote(commit, safe='')}"
            page, next_url = client.get_json(url, params={"recursive": True, "expand": False})
            entries = [RepoFile(**e) for e in page if e.get("type") == "file"]
            while next_url is not None:
                url = next_url
                page, next_url = client.get_json(url)
                entries.extend(RepoFile(**e) for e in page if e.get("type") == "file")
    except Exception as exc:  # every failure of a request ends here, named and explained
        raise client.failure(exc, doing=doing, url=url, repo=repo, repo_type=repo_type) from exc
    listing = Listing(repo, revision, commit)
    for entry in entries:
        relative = safe_relative_path(entry.path)
        if relative is None:
            listing.unsafe.append(entry.path)
            continue
        top = relative.parts[0] if len(relative.parts) > 1 else None
        dataset = canonical_dataset(top) if top else None
        archive = archive_name(entry.path) if len(relative.parts) == 1 else None
        if archive is not None:  # a dataset published as one archive (or its parts) at the top level
            dataset = canonical_dataset(archive_stem(archive[0]))
        sha256 = entry.lfs.sha256 if entry.lfs is not None else None
        blob_id = None if entry.lfs is not None else entry.blob_id
        listing.files.append(
            RemoteFile(str(relative), int(entry.size or 0), dataset, sha256, blob_id, archive[0] if archive else None)
        )
    listing.files.sort(key=lambda f: f.path)
    return listing


def select(listing: Listing, datasets: Sequence[str] | None) -> tuple[list[RemoteFile], list[RemoteFile]]:
    """Files of the chosen datasets (all known ones when None), and the files not understood.

    Raises:
        InputError: a requested dataset is unknown or not in the repository.
    """
    known = [f for f in listing.files if f.dataset is not None]
    unknown = [f for f in listing.files if f.dataset is None]
    if not datasets:
        return known, unknown
    wanted = set()
    for name in datasets:
        canonical = canonical_dataset(name)
        if canonical is None:
            raise InputError(
                f"unknown dataset {name!r}", hint="freetumor fetch-labels --list shows the repository's datasets"
            )
        wanted.add(canonical)
    present = {f.dataset for f in known}
    missing = sorted(wanted - present)
    if missing:
        raise InputError(
            f"dataset(s) {', '.join(missing)} not in {listing.repo}",
            hint=f"available: {', '.join(sorted(d for d in present if d))}",
        )
    return [f for f in known if f.dataset in wanted], unknown


def content_problem(path: Path, remote: RemoteFile) -> str | None:
    """Why a downloaded file is not the hub's (size, then sha256 or git blob id where listed), or None."""
    import hashlib

    size = path.stat().st_size
    if size != remote.size:
        return f"{remote.path}: {size} bytes, the hub lists {remote.size}"
    if remote.sha256 is None and remote.blob_id is None:
        return None
    sha256, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            sha256.update(block)
            blob.update(block)
    if remote.sha256 is not None and sha256.hexdigest() != remote.sha256:
        return f"{remote.path}: its sha256 differs from the hub's"
    if remote.sha256 is None and remote.blob_id is not None and blob.hexdigest() != remote.blob_id:
        return f"{remote.path}: its content differs from the hub's (git blob id)"
    return None


def partial_path(target: Path, remote: RemoteFile) -> Path:
    """Where ``remote`` is transferred before it is renamed to ``target``: hidden, beside it, named after the
    content's hash so that a partial file of another version of the file is never resumed."""
    return target.parent / f".{target.name}.{(remote.digest() or 'unhashed')[:12]}{PARTIAL_SUFFIX}"


class _Stopped(Exception):
    """A transfer left off because its run was stopped (its partial file is kept for the rerun)."""


class _WriteFailed(Exception):
    """A write into the local folder failed (the disk full, read-only, not writable): not the hub's fault."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _local_write() -> Iterator[None]:
    """Marks an :class:`OSError` inside as the local folder's (the hub client's HTTP errors are OSErrors too)."""
    try:
        yield
    except OSError as exc:
        raise _WriteFailed(exc) from exc


def download_file(
    client: HubClient,
    repo: str,
    remote: RemoteFile,
    target: Path,
    *,
    commit: str,
    repo_type: str = "dataset",
    stop: threading.Event | None = None,
    option: str = "--dest",
) -> None:
    """Download ``remote`` to ``target``: into :func:`partial_path`, resumed from the length it has with an
    HTTP ``Range`` request, checked against the hub's size and hash, then renamed into place.

    Raises:
        HubError: a fault of the hub or the network (the partial file is kept: a rerun resumes it), or a
            download that is not the hub's file (it is removed). OutputBusyError: another run is
            downloading the same file. FreetumorError: the folder cannot be written (``option`` names it;
            the partial file is removed). _Stopped: ``stop`` was set.
    """
    import fcntl

    part = partial_path(target, remote)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # the umask applies
    except OSError as exc:
        raise cannot_write(target.parent, exc, option=option) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(
                f"{target} is being downloaded by another run", hint="let it finish, or choose another folder"
            ) from None
        with _local_write():
            _remove_other_versions(target, part)
            if os.fstat(fd).st_size > remote.size:
                os.ftruncate(fd, 0)
        if os.fstat(fd).st_size < remote.size:
            _transfer(client, repo, remote, fd, commit=commit, repo_type=repo_type, stop=stop)
        problem = content_problem(part, remote)
        if problem is not None:
            part.unlink(missing_ok=True)
            raise HubError(f"the download of {problem}", hint="rerun; if it persists, the repository changed")
        with _local_write():
            os.replace(part, target)
    except _WriteFailed as failed:
        part.unlink(missing_ok=True)  # a full or read-only disk: nothing half-written stays behind
        raise cannot_write(target.parent, failed.error, option=option) from None
    finally:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size == 0:  # stopped or refused before a byte came: nothing to resume
                part.unlink(missing_ok=True)
        os.close(fd)


def _remove_other_versions(target: Path, part: Path) -> None:
    import glob

    for other in target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL_SUFFIX}"):
        if other != part:
            other.unlink(missing_ok=True)


def _transfer(
    client: HubClient,
    repo: str,
    remote: RemoteFile,
    fd: int,
    *,
    commit: str,
    repo_type: str,
    stop: threading.Event | None,
) -> None:
    """Append the bytes the file ``fd`` lacks, asking for them with ``Range: bytes=<its length>-``."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import hf_raise_for_status

    url = hf_hub_url(repo, remote.path, repo_type=repo_type, revision=commit, endpoint=client.endpoint)
    have = os.fstat(fd).st_size
    headers = {**client.headers(), "Accept-Encoding": "identity"}  # byte ranges of the file itself
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with get_session().stream("GET", url, headers=headers, timeout=client.timeout) as response:
            if response.status_code >= 400:
                response.read()
            if response.status_code == 416:  # the partial file is no prefix of the hub's: start again
                with _local_write():
                    os.ftruncate(fd, 0)
            hf_raise_for_status(response)
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if response.status_code == 206 and start != str(have):
                raise HubError(f"the hub at {client.endpoint} sent another part of {remote.path} than asked for")
            if have and response.status_code != 206:
                with _local_write():
                    os.ftruncate(fd, 0)  # the server sent the whole file (it ignores ranges): take it whole
                have = 0
            for chunk in response.iter_bytes(CHUNK_BYTES):
                if stop is not None and stop.is_set():
                    raise _Stopped
                view = memoryview(chunk)
                with _local_write():
                    while view:
                        view = view[os.write(fd, view) :]
                have += len(chunk)
    except (_Stopped, _WriteFailed, HubError):
        raise
    except Exception as exc:  # every failure of the request ends here, named and explained
        doing = f"downloading {remote.path} ({format_size(have)} of {format_size(remote.size)} in)"
        raise client.failure(exc, doing=doing, url=url, repo=repo, repo_type=repo_type) from exc
    if have != remote.size:
        raise HubError(
            f"the hub at {client.endpoint} sent {format_size(have)} of {remote.path}, which it lists at {format_size(remote.size)}",
            hint="rerun: a partial file resumes where it stopped",
        )


def format_size(n: float) -> str:
    """A byte count for people: ``1.5 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def run_interruptibly(
    work: Callable[[T], R], items: Sequence[T], *, workers: int, stop: threading.Event
) -> Iterator[tuple[T, R]]:
    """``work(item)`` for every item on up to ``workers`` threads; yields (item, result) as each finishes.

    The calling thread only waits, so Ctrl-C (and SIGTERM, see :func:`sigterm_interrupts`) reaches it at
    once. Then, or at the first error (which is raised), ``stop`` is set: each transfer checks it between
    chunks. The threads are daemons, so one waiting on a silent network cannot hold up the exit (a
    ``ThreadPoolExecutor`` joins its threads at exit, after the file being transferred).
    """
    todo: queue.SimpleQueue[T] = queue.SimpleQueue()
    done: queue.SimpleQueue[tuple[T, R | None, BaseException | None]] = queue.SimpleQueue()
    for item in items:
        todo.put(item)

    def worker() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((item, work(item), None))
            except BaseException as exc:  # handed to the calling thread, which raises it
                stop.set()  # before this thread could take the next item
                done.put((item, None, exc))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(max(1, workers), len(items)))]
    for thread in threads:
        thread.start()
    try:
        for _ in items:
            while True:
                try:
                    item, result, error = done.get(timeout=0.1)
                    break
                except queue.Empty:
                    continue
            if error is not None:
                raise error
            yield item, result  # type: ignore[misc]
    finally:
        stop.set()
        deadline = time.monotonic() + 1.0  # let transfers between two chunks close their partial files
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside, SIGTERM stops the run as Ctrl-C does (a KeyboardInterrupt in the main thread), unless the
    program handles SIGTERM already: its default would end the process without a word or a clean-up."""
    import signal

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _local_complete(dest: Path, files: Sequence[RemoteFile]) -> bool:
    return all((dest / f.path).is_file() and (dest / f.path).stat().st_size == f.size for f in files)


def _read_record(dest: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((dest / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


ARCHIVE_FOLDER = ".freetumor_archives"


def fetch_labels(
    dest: PathLike = "data",
    *,
    repo: str = DEFAULT_REPO,
    datasets: Sequence[str] | None = None,
    revision: str = "main",
    token: str | None = None,
    workers: int = 8,
    keep_archives: bool = False,
    timeout: float | None = None,
    on_file_done: Callable[[RemoteFile, bool], None] | None = None,
    on_listing: Callable[[list[RemoteFile]], None] | None = None,
) -> FetchResult:
    """Download the chosen datasets' label files into ``dest`` (a data root), resuming and idempotent.

    Files inside dataset folders are mirrored at their repository path. A dataset published as an
    archive at the top level (``BTCV.zip``, ``BTCV.tar.gz``, or parts ``Flare23.zip.001`` …) is
    downloaded to ``<dest>/.freetumor_archives/``, checked, and extracted safely into ``<dest>/<dataset>/``
    (an archive holding the dataset's folder or only its contents alike); the archive is then removed
    unless ``keep_archives``. Every download is checked against the hub's size and hash. A file already
    present and verified, or an archive already extracted, is not fetched again; a file cut off by an
    interruption, a kill or a fault of the hub is resumed where it stopped. Offline (``HF_HUB_OFFLINE=1``),
    the local copy recorded by an earlier complete run is used if every file of it is present.

    ``timeout`` bounds each network call (:func:`hub_timeout`). Ctrl-C or SIGTERM stop the run at once
    (KeyboardInterrupt): finished files are kept, and nothing half-written is left under a final name.

    Raises:
        HubError: the hub unreachable, silent, or failing (the file is named). InputError: an unknown
        dataset, or an unsafe or corrupt archive. FreetumorError: ``dest`` cannot be written.
    """
    with sigterm_interrupts():
        return _fetch_labels(
            Path(dest), repo=repo, datasets=datasets, revision=revision, token=token, workers=workers,
            keep_archives=keep_archives, timeout=timeout, on_file_done=on_file_done, on_listing=on_listing,
        )  # fmt: skip


def _fetch_labels(
    dest_path: Path,
    *,
    repo: str,
    datasets: Sequence[str] | None,
    revision: str,
    token: str | None,
    workers: int,
    keep_archives: bool,
    timeout: float | None,
    on_file_done: Callable[[RemoteFile, bool], None] | None,
    on_listing: Callable[[list[RemoteFile]], None] | None,
) -> FetchResult:
    if hub_offline():
        return _offline_result(dest_path, datasets)
    client = HubClient.from_environment(token, timeout)
    listing = list_remote(repo, revision=revision, token=client.token, timeout=client.timeout)
    chosen, unknown = select(listing, datasets)
    for f in chosen:
        if not _inside(dest_path, PurePosixPath(f.path)):
            listing.unsafe.append(f.path)
    chosen = [f for f in chosen if f.path not in listing.unsafe]
    result = FetchResult(dest_path, listing.commit, unknown=unknown, unsafe=list(listing.unsafe))
    if on_listing:
        on_listing(chosen)
    previous = _read_record(dest_path) or {}
    verified: dict[str, Any] = dict(previous.get("files") or {})
    extracted: dict[str, Any] = dict(previous.get("archives") or {})
    plain = [f for f in chosen if f.archive is None]
    archives: dict[str, list[RemoteFile]] = {}
    for f in chosen:
        if f.archive is not None:
            archives.setdefault(f.archive, []).append(f)
    todo = []
    for f in plain:
        target = dest_path / f.path
        known = verified.get(f.path) or {}
        fresh = target.is_file() and target.stat().st_size == f.size
        if fresh and known.get("digest") != f.digest():  # placed by hand, or by an older run: check it once
            fresh = content_problem(target, f) is None
            if fresh:
                verified[f.path] = {"size": f.size, "dataset": f.dataset, "digest": f.digest()}
        if fresh:
            result.up_to_date.append(f)
            if on_file_done:
                on_file_done(f, False)
        else:
            todo.append(f)
    for name, parts in sorted(archives.items()):
        if _archive_done(dest_path, extracted.get(name), parts):
            result.up_to_date.extend(parts)
            for f in parts:
                if on_file_done:
                    on_file_done(f, False)
        else:
            check_parts(name, [archive_name(f.path)[1] or 0 for f in parts])
            todo.extend(parts)
    if todo:
        try:
            dest_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cannot_write(dest_path, exc) from None

        def download(f: RemoteFile) -> RemoteFile:
            local_dir = dest_path / ARCHIVE_FOLDER if f.archive else dest_path
            target = local_dir / f.path
            if target.is_file() and content_problem(target, f) is None:
                return f  # an archive part downloaded by an interrupted run
            download_file(client, repo, f, target, commit=listing.commit, stop=stop)
            return f

        stop = threading.Event()
        for f, _ in run_interruptibly(download, todo, workers=workers, stop=stop):
            result.downloaded.append(f)
            if f.archive is None:
                verified[f.path] = {"size": f.size, "dataset": f.dataset, "digest": f.digest()}
            if on_file_done:
                on_file_done(f, True)
    for name, parts in sorted(archives.items()):
        if _archive_done(dest_path, extracted.get(name), parts):
            continue
        dataset = parts[0].dataset
        assert dataset is not None
        local = [dest_path / ARCHIVE_FOLDER / f.path for f in parts]
        try:
            placed = extract_archive(
                local, dest_path / dataset, name=name,
                strip=lambda top, d=dataset: top[0] if canonical_dataset(top[0]) == d else None,
            )  # fmt: skip
        except OSError as exc:  # a full or read-only --dest (what the archive's own faults are not)
            raise cannot_write(dest_path / dataset, exc) from None
        extracted[name] = {
            "dataset": dataset,
            "parts": {f.path: f.digest() for f in parts},
            "files": sorted(str(p.relative_to(dest_path)) for p in placed),
        }
        result.extracted[name] = len(placed)
        _write_record(dest_path, repo, revision, listing.commit, verified, extracted)
        if not keep_archives:
            for path in local:
                path.unlink(missing_ok=True)
    _write_record(dest_path, repo, revision, listing.commit, verified, extracted)
    return result


def _archive_done(dest: Path, record: Any, parts: Sequence[RemoteFile]) -> bool:
    """An archive was extracted from these very parts and its files are all there."""
    if not isinstance(record, dict) or record.get("parts") != {f.path: f.digest() for f in parts}:
        return False
    return all((dest / name).is_file() for name in record.get("files", []))


def _write_record(dest: Path, repo: str, revision: str, commit: str, files: Any, archives: Any) -> None:
    record = {
        "repo": repo,
        "revision": revision,
        "commit": commit,
        "endpoint": hub_endpoint(),
        "files": files,
        "archives": archives,
    }
    try:
        write_text_atomic(dest / RECORD_NAME, json.dumps(record, indent=1) + "\n")
    except OSError as exc:
        raise cannot_write(dest, exc) from None


def _offline_result(dest: Path, datasets: Sequence[str] | None) -> FetchResult:
    record = _read_record(dest)
    listed = record.get("files") if record is not None else None
    if record is None or not isinstance(listed, dict):
        raise HubError(
            f"HF_HUB_OFFLINE is set and {dest} holds no complete local copy",
            hint="unset HF_HUB_OFFLINE to download, or place the label files under --dest by hand",
        )
    files = [RemoteFile(path, int(meta["size"]), meta.get("dataset")) for path, meta in listed.items()]
    for meta in (record.get("archives") or {}).values():
        for path in meta.get("files", []):
            size = (dest / path).stat().st_size if (dest / path).is_file() else -1
            files.append(RemoteFile(path, size, meta.get("dataset")))
    if datasets:
        wanted = {canonical_dataset(d) for d in datasets}
        files = [f for f in files if f.dataset in wanted]
        if not files:
            raise HubError(f"HF_HUB_OFFLINE is set and the local copy in {dest} holds none of {', '.join(datasets)}")
    if not _local_complete(dest, files):
        missing = [f.path for f in files if not (dest / f.path).is_file()]
        raise HubError(
            f"HF_HUB_OFFLINE is set and the local copy in {dest} is incomplete ({len(missing)} file(s) missing, e.g. {missing[:1]})",
            hint="unset HF_HUB_OFFLINE to finish the download",
        )
    result = FetchResult(dest, str(record.get("commit", "")), up_to_date=files, offline=True)
    result.notes.append(
        f"offline: using the complete local copy in {dest} (commit {str(record.get('commit', ''))[:12]})"
    )
    return result
