"""Download organ labels from the Hugging Face dataset ``Luffy503/FreeTumor`` into a data root.

The repository's layout is discovered from its file listing: top-level folders are mapped to dataset
names (:mod:`freetumor_cli.core.datasets`), files are mirrored under ``--dest`` at their repository path,
and anything not understood is reported. Paths that would leave ``--dest`` are refused.

The endpoint is read from ``HF_ENDPOINT`` at call time (``huggingface_hub`` reads it only at import) and
passed explicitly; ``HF_HUB_OFFLINE`` is honoured the same way. After a complete download a record,
``.freetumor_fetch.json``, lists every file with its size, so an offline run can tell a complete local
copy from an incomplete one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from freetumor_cli.core.datasets import canonical_dataset
from freetumor_cli.core.errors import FreetumorError, InputError
from freetumor_cli.core.io import write_text_atomic

DEFAULT_REPO = "Luffy503/FreeTumor"
DEFAULT_ENDPOINT = "https://huggingface.co"
RECORD_NAME = ".freetumor_fetch.json"


class HubError(FreetumorError):
    """The hub could not be reached or refused the request."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    dataset: str | None  # registry name, None when the top-level folder is not a known dataset


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


@dataclass
class FetchResult:
    dest: Path
    commit: str
    downloaded: list[RemoteFile] = field(default_factory=list)
    up_to_date: list[RemoteFile] = field(default_factory=list)
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


def _hub_failure(exc: Exception, endpoint: str, repo: str) -> HubError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RepositoryNotFoundError | GatedRepoError):
        return HubError(
            f"dataset repository {repo!r} not found or not accessible at {endpoint}",
            hint="check --repo, and set HF_TOKEN or --token if it is gated",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"revision not found in {repo!r} at {endpoint}", hint="check --revision")
    return HubError(
        f"cannot reach the Hugging Face hub at {endpoint} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})",
        hint="check the network or HF_ENDPOINT; offline, set HF_HUB_OFFLINE=1 to use a complete local copy, "
        "or place the label files under --dest by hand",
    )


def list_remote(repo: str = DEFAULT_REPO, *, revision: str = "main", token: str | None = None) -> Listing:
    """List a dataset repository's files at ``revision`` and sort them into datasets."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.dataset_info(repo, revision=revision)
        commit = info.sha or revision
        entries = list(api.list_repo_tree(repo, recursive=True, revision=commit, repo_type="dataset"))
    except Exception as exc:  # every failure of the hub client ends here, named and explained
        raise _hub_failure(exc, endpoint, repo) from exc
    listing = Listing(repo, revision, commit)
    for entry in entries:
        if not isinstance(entry, RepoFile):
            continue
        relative = safe_relative_path(entry.path)
        if relative is None:
            listing.unsafe.append(entry.path)
            continue
        top = relative.parts[0] if len(relative.parts) > 1 else None
        dataset = canonical_dataset(top) if top else None
        listing.files.append(RemoteFile(str(relative), int(entry.size or 0), dataset))
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


def _local_complete(dest: Path, files: Sequence[RemoteFile]) -> bool:
    return all((dest / f.path).is_file() and (dest / f.path).stat().st_size == f.size for f in files)


def _read_record(dest: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((dest / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def fetch_labels(
    dest: str | os.PathLike[str] = "data",
    *,
    repo: str = DEFAULT_REPO,
    datasets: Sequence[str] | None = None,
    revision: str = "main",
    token: str | None = None,
    workers: int = 8,
    on_file_done: Callable[[RemoteFile, bool], None] | None = None,
    on_listing: Callable[[list[RemoteFile]], None] | None = None,
) -> FetchResult:
    """Download the chosen datasets' label files into ``dest`` (a data root), resuming and idempotent.

    A file already present with the listed size is not downloaded again; a partly downloaded file is
    resumed by ``huggingface_hub``. Offline (``HF_HUB_OFFLINE=1``), the local copy recorded by an earlier
    complete run is used if every file of it is present.
    """
    dest_path = Path(dest)
    token = token or os.environ.get("HF_TOKEN") or None
    if hub_offline():
        return _offline_result(dest_path, datasets)
    listing = list_remote(repo, revision=revision, token=token)
    chosen, unknown = select(listing, datasets)
    for f in chosen:
        if not _inside(dest_path, PurePosixPath(f.path)):
            listing.unsafe.append(f.path)
    chosen = [f for f in chosen if f.path not in listing.unsafe]
    result = FetchResult(dest_path, listing.commit, unknown=unknown, unsafe=list(listing.unsafe))
    if on_listing:
        on_listing(chosen)
    todo = []
    for f in chosen:
        target = dest_path / f.path
        if target.is_file() and target.stat().st_size == f.size:
            result.up_to_date.append(f)
            if on_file_done:
                on_file_done(f, False)
        else:
            todo.append(f)
    if todo:
        from huggingface_hub import hf_hub_download

        endpoint = hub_endpoint()
        dest_path.mkdir(parents=True, exist_ok=True)

        def download(f: RemoteFile) -> RemoteFile:
            # A file present with the wrong size is damaged: huggingface_hub's own record would call it
            # up to date, so force it.
            damaged = (dest_path / f.path).exists()
            hf_hub_download(
                repo,
                f.path,
                repo_type="dataset",
                revision=listing.commit,
                local_dir=dest_path,
                token=token,
                endpoint=endpoint,
                force_download=damaged,
            )
            return f

        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for f in pool.map(download, todo):
                    result.downloaded.append(f)
                    if on_file_done:
                        on_file_done(f, True)
        except FreetumorError:
            raise
        except Exception as exc:
            raise _hub_failure(exc, endpoint, repo) from exc
    previous = _read_record(dest_path) or {}
    files_before = previous.get("files")
    recorded: dict[str, Any] = dict(files_before) if isinstance(files_before, dict) else {}
    recorded.update({f.path: {"size": f.size, "dataset": f.dataset} for f in chosen})
    record = {
        "repo": repo,
        "revision": revision,
        "commit": listing.commit,
        "endpoint": hub_endpoint(),
        "files": recorded,
    }
    write_text_atomic(dest_path / RECORD_NAME, json.dumps(record, indent=1) + "\n")
    return result


def _offline_result(dest: Path, datasets: Sequence[str] | None) -> FetchResult:
    record = _read_record(dest)
    listed = record.get("files") if record is not None else None
    if record is None or not isinstance(listed, dict):
        raise HubError(
            f"HF_HUB_OFFLINE is set and {dest} holds no complete local copy",
            hint="unset HF_HUB_OFFLINE to download, or place the label files under --dest by hand",
        )
    files = [RemoteFile(path, int(meta["size"]), meta.get("dataset")) for path, meta in listed.items()]
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
