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

from freetumor_cli.core.archives import archive_name, archive_stem, check_parts, extract_archive
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


def _hub_failure(exc: Exception, endpoint: str, repo: str, repo_type: str = "dataset") -> HubError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RepositoryNotFoundError | GatedRepoError):
        return HubError(
            f"{repo_type} repository {repo!r} not found or not accessible at {endpoint}",
            hint="check --repo, and set HF_TOKEN or --token if it is gated",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"revision not found in {repo!r} at {endpoint}", hint="check --revision")
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    if hub_offline():
        return HubError(
            f"HF_HUB_OFFLINE is set, and this needs the hub at {endpoint}",
            hint="unset HF_HUB_OFFLINE to download, or place the files under --dest by hand",
        )
    return HubError(
        f"cannot reach the Hugging Face hub at {endpoint} ({detail})",
        hint="check the network or HF_ENDPOINT; offline, set HF_HUB_OFFLINE=1 to use a complete local copy, "
        "or place the files under --dest by hand",
    )


def list_remote(
    repo: str = DEFAULT_REPO, *, revision: str = "main", token: str | None = None, repo_type: str = "dataset"
) -> Listing:
    """List a repository's files at ``revision`` (with their sizes and hashes) and sort them into datasets."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.repo_info(repo, revision=revision, repo_type=repo_type)
        commit = info.sha or revision
        entries = list(api.list_repo_tree(repo, recursive=True, revision=commit, repo_type=repo_type))
    except Exception as exc:  # every failure of the hub client ends here, named and explained
        raise _hub_failure(exc, endpoint, repo, repo_type) from exc
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
    dest: str | os.PathLike[str] = "data",
    *,
    repo: str = DEFAULT_REPO,
    datasets: Sequence[str] | None = None,
    revision: str = "main",
    token: str | None = None,
    workers: int = 8,
    keep_archives: bool = False,
    on_file_done: Callable[[RemoteFile, bool], None] | None = None,
    on_listing: Callable[[list[RemoteFile]], None] | None = None,
) -> FetchResult:
    """Download the chosen datasets' label files into ``dest`` (a data root), resuming and idempotent.

    Files inside dataset folders are mirrored at their repository path. A dataset published as an
    archive at the top level (``BTCV.zip``, ``BTCV.tar.gz``, or parts ``Flare23.zip.001`` …) is
    downloaded to ``<dest>/.freetumor_archives/``, checked, and extracted safely into ``<dest>/<dataset>/``
    (an archive holding the dataset's folder or only its contents alike); the archive is then removed
    unless ``keep_archives``. Every download is checked against the hub's size and hash. A file already
    present and verified, or an archive already extracted, is not fetched again; a partly downloaded file
    is resumed by ``huggingface_hub``. Offline (``HF_HUB_OFFLINE=1``), the local copy recorded by an
    earlier complete run is used if every file of it is present.
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
    endpoint = hub_endpoint()
    if todo:
        from huggingface_hub import hf_hub_download

        dest_path.mkdir(parents=True, exist_ok=True)

        def download(f: RemoteFile) -> RemoteFile:
            local_dir = dest_path / ARCHIVE_FOLDER if f.archive else dest_path
            target = local_dir / f.path
            if target.is_file() and content_problem(target, f) is None:
                return f  # an archive part downloaded by an interrupted run
            hf_hub_download(
                repo, f.path, repo_type="dataset", revision=listing.commit, local_dir=local_dir, token=token,
                endpoint=endpoint, force_download=target.exists(),  # present but damaged: fetch it again
            )  # fmt: skip
            problem = content_problem(target, f)
            if problem is not None:
                target.unlink(missing_ok=True)
                raise HubError(
                    f"the download of {problem}", hint="run fetch-labels again; if it persists, the repository changed"
                )
            return f

        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for f in pool.map(download, todo):
                    result.downloaded.append(f)
                    if f.archive is None:
                        verified[f.path] = {"size": f.size, "dataset": f.dataset, "digest": f.digest()}
                    if on_file_done:
                        on_file_done(f, True)
        except FreetumorError:
            raise
        except Exception as exc:
            raise _hub_failure(exc, endpoint, repo) from exc
    for name, parts in sorted(archives.items()):
        if _archive_done(dest_path, extracted.get(name), parts):
            continue
        dataset = parts[0].dataset
        assert dataset is not None
        local = [dest_path / ARCHIVE_FOLDER / f.path for f in parts]
        placed = extract_archive(
            local, dest_path / dataset, name=name,
            strip=lambda top, d=dataset: top[0] if canonical_dataset(top[0]) == d else None,
        )  # fmt: skip
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
    write_text_atomic(dest / RECORD_NAME, json.dumps(record, indent=1) + "\n")


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
