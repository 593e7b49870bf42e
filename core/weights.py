"""The authors' released weights: downloaded once into a cache folder and converted into freetumor's.

The cache is ``--home``, else ``$FREETUMOR_HOME``, else ``~/.freetumor``:

- ``downloads/<repo>/<path>``: the files as the hub serves them (checked against its size and sha256);
- ``checkpoints/<name>/``: each converted once (:func:`~freetumor_cli.core.checkpoints.convert_released`)
  into a freetumor folder that every command takes: ``baseline`` and ``covid-baseline`` (segmentors:
  ``model.safetensors`` + ``model.json``), ``tgan`` (the generator, its discriminator and, in
  ``critic/``, its 7-class baseline); ``voco`` stays the ``.pt`` file (``train-seg --init`` reads it safely);
- ``weights.json``: what was fetched, from which commit, with sizes and hashes.

A second run downloads and converts nothing, after checking the downloads against the hub's sizes and
hashes and the converted files against theirs (in ``weights.json``): a damaged file is fetched or
converted again. An interrupted download resumes where it stopped (:func:`~freetumor_cli.core.hub.download_file`);
offline (``HF_HUB_OFFLINE=1``) a complete, intact cache is used as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freetumor_cli.core import PathLike
from freetumor_cli.core.errors import ConfigError
from freetumor_cli.core.hub import (
    HubClient,
    HubError,
    RemoteFile,
    cannot_write,
    content_problem,
    download_file,
    hub_offline,
    list_remote,
    run_interruptibly,
    sigterm_interrupts,
)
from freetumor_cli.core.outputs import write_text_atomic

HOME_VARIABLE = "FREETUMOR_HOME"
RECORD = "weights.json"
HOME_OPTION = "--home or FREETUMOR_HOME"


@dataclass(frozen=True)
class ReleasedWeights:
    """One released file.

    Attributes:
        name: freetumor's name for it (``fetch-weights NAME``).
        repo: the model repository; path: the file there.
        kind: ``segmentor``, ``generator`` or ``backbone``.
        task: the task a segmentor predicts.
        use: where it goes, for ``--list``.
    """

    name: str
    repo: str
    path: str
    kind: str
    task: str | None
    use: str


RELEASED: dict[str, ReleasedWeights] = {
    w.name: w
    for w in (
        ReleasedWeights(
            "baseline", "Luffy503/FreeTumor", "baseline/model_baseline_segmentor.pt", "segmentor", "all",
            "the 7-class abdomen baseline: train-seg --baseline, train-synth --baseline, evaluate --checkpoint",
        ),
        ReleasedWeights(
            "covid-baseline", "Luffy503/FreeTumor", "baseline/model_covid_voco160k.pt", "segmentor", "covid",
            "the COVID-19 baseline (background, lesion): train-seg --organ covid --baseline, train-synth --region chest "
            "--baseline, evaluate --checkpoint",
        ),
        ReleasedWeights(
            "tgan", "Luffy503/FreeTumor", "baseline/TGAN.pt", "generator", None,
            "the abdomen generator: train-seg --synth, train-synth --init, synthesize --generator",
        ),
        ReleasedWeights(
            "voco", "Luffy503/FreeTumor", "pretrained/VoCo_B_SSL_head.pt", "backbone", None,
            "VoCo self-supervised SwinUNETR-B encoder: train-seg --init",
        ),
    )
}  # fmt: skip


def weights_home(home: PathLike | None = None) -> Path:
    """The cache folder: ``home``, else ``$FREETUMOR_HOME``, else ``~/.freetumor``."""
    if home is not None:
        return Path(home)
    return Path(os.environ.get(HOME_VARIABLE) or Path.home() / ".freetumor")


@dataclass
class FetchedWeights:
    """What :func:`fetch_weights` did for each file."""

    home: Path
    paths: dict[str, Path] = field(default_factory=dict)  # name -> what commands take
    downloaded: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    offline: bool = False


def usable_path(home: Path, weights: ReleasedWeights) -> Path:
    """What commands take for a released file: its converted folder, or the ``.pt`` (VoCo)."""
    if weights.kind == "backbone":
        return home / "downloads" / weights.repo / weights.path
    return home / "checkpoints" / weights.name


def _read_record(home: Path) -> dict[str, Any]:
    try:
        data = json.loads((home / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fetch_weights(
    names: Sequence[str] | None = None,
    *,
    home: PathLike | None = None,
    revision: str = "main",
    token: str | None = None,
    timeout: float | None = None,
    on_file_done: Callable[[str, str], None] | None = None,
) -> FetchedWeights:
    """Download (resuming) and convert the released files ``names`` (all when None) into the cache.

    ``timeout`` bounds each network call (:func:`~freetumor_cli.core.hub.hub_timeout`). Ctrl-C or SIGTERM
    stop it at once (KeyboardInterrupt); nothing half-written is left under a final name.

    Raises:
        ConfigError: an unknown name. HubError: the hub unreachable, silent or failing, a file missing or
        damaged, or an incomplete or damaged cache offline. FreetumorError: the cache cannot be written.
    """
    root = weights_home(home)
    chosen = [RELEASED[n] for n in _check_names(names)]
    with sigterm_interrupts():
        if hub_offline():
            return _offline(root, chosen)
        client = HubClient.from_environment(token, timeout)
        return _fetch(root, chosen, revision=revision, client=client, on_file_done=on_file_done)


def _offline(root: Path, chosen: Sequence[ReleasedWeights]) -> FetchedWeights:
    result = FetchedWeights(root, offline=True)
    files: dict[str, Any] = dict(_read_record(root).get("files") or {})
    for w in chosen:
        entry = files.get(w.name)
        path = usable_path(root, w)
        if not isinstance(entry, dict) or not path.exists():
            raise HubError(
                f"HF_HUB_OFFLINE is set and the cache {root} lacks {w.name} ({w.repo}/{w.path})",
                hint="unset HF_HUB_OFFLINE to download it, or point --home / FREETUMOR_HOME at a complete cache",
            )
        problem = _cache_problem(root, w, entry)
        if problem is not None:
            raise HubError(
                f"HF_HUB_OFFLINE is set and the cache's {w.name} is damaged ({problem})",
                hint="unset HF_HUB_OFFLINE to fetch it again",
            )
        result.paths[w.name] = path
        result.up_to_date.append(w.name)
    return result


def _fetch(
    root: Path,
    chosen: Sequence[ReleasedWeights],
    *,
    revision: str,
    client: HubClient,
    on_file_done: Callable[[str, str], None] | None,
) -> FetchedWeights:
    result = FetchedWeights(root)
    files: dict[str, Any] = dict(_read_record(root).get("files") or {})
    listings: dict[str, Any] = {}
    for w in chosen:
        if w.repo not in listings:
            listings[w.repo] = list_remote(
                w.repo, revision=revision, token=client.token, repo_type="model", timeout=client.timeout
            )
        listing = listings[w.repo]
        remote = next((f for f in listing.files if f.path == w.path), None)
        if remote is None:
            raise HubError(f"{w.repo} holds no {w.path} at {revision}", hint="fetch-weights --list shows what it holds")
        downloaded = _download(client, root, w, remote, listing.commit)
        entry = files.get(w.name)
        previous: dict[str, Any] = entry if isinstance(entry, dict) else {}
        converted = _convert(root, w, remote, previous)
        files[w.name] = {
            "repo": w.repo,
            "path": w.path,
            "commit": listing.commit,
            "size": remote.size,
            "digest": remote.digest(),
            "converted": previous.get("converted", {}) if converted is None else converted,
        }
        try:
            write_text_atomic(root / RECORD, json.dumps({"files": files}, indent=1) + "\n")
        except OSError as exc:
            raise cannot_write(root, exc, option=HOME_OPTION) from None
        result.paths[w.name] = usable_path(root, w)
        if downloaded:
            result.downloaded.append(w.name)
        if converted is not None:
            result.converted.append(w.name)
        if not downloaded and converted is None:
            result.up_to_date.append(w.name)
        if on_file_done:
            on_file_done(w.name, "downloaded" if downloaded else "up to date")
    return result


def _check_names(names: Sequence[str] | None) -> list[str]:
    if not names:
        return list(RELEASED)
    unknown = [n for n in names if n not in RELEASED]
    if unknown:
        raise ConfigError(f"unknown released file {unknown[0]!r}", hint=f"choose among {', '.join(RELEASED)}")
    return list(dict.fromkeys(names))


def _download(client: HubClient, root: Path, weights: ReleasedWeights, remote: RemoteFile, commit: str) -> bool:
    """Download the file unless the cache holds it intact; returns whether it was downloaded."""
    import threading

    target = root / "downloads" / weights.repo / weights.path
    if target.is_file() and content_problem(target, remote) is None:
        return False

    def download(f: RemoteFile) -> None:
        download_file(client, weights.repo, f, target, commit=commit, repo_type="model", stop=stop, option=HOME_OPTION)

    stop = threading.Event()
    for _ in run_interruptibly(download, [remote], workers=1, stop=stop):  # Ctrl-C is heard while it runs
        pass
    return True


def _convert(
    root: Path, weights: ReleasedWeights, remote: RemoteFile, previous: dict[str, Any]
) -> dict[str, Any] | None:
    """Convert the downloaded file into freetumor's folder unless it was converted from these bytes and
    the folder is intact; returns the converted files' sizes and hashes, or None when nothing was done."""
    from freetumor_cli.core.checkpoints import convert_released, read_torch_file

    source = root / "downloads" / weights.repo / weights.path
    out = usable_path(root, weights)
    if previous.get("digest") == remote.digest() and _converted_problem(out, previous.get("converted")) is None:
        return None
    if weights.kind == "backbone":
        read_torch_file(source)  # checks it reads safely; train-seg --init takes the file itself
        return {}
    import shutil

    tmp = out.parent / f".{out.name}.converting"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        convert_released(source, tmp, task=weights.task)
        manifest = _manifest(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except OSError as exc:
        raise cannot_write(out.parent, exc, option=HOME_OPTION) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted or failed conversion leaves nothing
    return manifest


def _manifest(folder: Path) -> dict[str, Any]:
    """Size and sha256 of every file in a converted folder."""
    import hashlib

    manifest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        manifest[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return manifest


def _converted_problem(folder: Path, manifest: Any) -> str | None:
    """Why a converted folder is not what was written (a file missing, cut short or changed), or None."""
    if not isinstance(manifest, dict):
        return f"{folder} has no record of its files"
    for name, meta in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        problem = content_problem(path, RemoteFile(str(path), int(meta.get("size", -1)), None, meta.get("sha256")))
        if problem is not None:
            return problem
    return None


def _cache_problem(root: Path, weights: ReleasedWeights, entry: dict[str, Any]) -> str | None:
    """Why the cached download or its converted folder differ from what was recorded, or None."""
    download = root / "downloads" / weights.repo / weights.path
    digest = str(entry.get("digest") or "")
    recorded = RemoteFile(
        str(download), int(entry.get("size", -1)), None, digest if len(digest) == 64 else None,
        digest if len(digest) == 40 else None,
    )  # fmt: skip
    if not download.is_file():
        return f"{download} is missing"
    problem = content_problem(download, recorded)
    if problem is None and weights.kind != "backbone" and entry.get("converted") is not None:  # older caches: none
        problem = _converted_problem(usable_path(root, weights), entry.get("converted"))
    return problem
