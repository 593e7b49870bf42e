"""The authors' released weights: downloaded once into a cache folder and converted into freetumor's.

The cache is ``--home``, else ``$FREETUMOR_HOME``, else ``~/.freetumor``:

- ``downloads/<repo>/<path>``: the files as the hub serves them (checked against its size and sha256);
- ``checkpoints/<name>/``: each converted once (:func:`~freetumor_cli.core.checkpoints.convert_released`)
  into a freetumor folder that every command takes: ``baseline`` and ``covid-baseline`` (segmentors:
  ``model.safetensors`` + ``model.json``), ``tgan`` (the generator, its discriminator and, in
  ``critic/``, its 7-class baseline); ``voco`` stays the ``.pt`` file (``train-seg --init`` reads it safely);
- ``weights.json``: what was fetched, from which commit, with sizes and hashes.

A second run downloads and converts nothing; an interrupted download resumes; offline
(``HF_HUB_OFFLINE=1``) a complete cache is used as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freetumor_cli.core.errors import ConfigError
from freetumor_cli.core.hub import (
    HubError,
    RemoteFile,
    _hub_failure,
    content_problem,
    hub_endpoint,
    hub_offline,
    list_remote,
)
from freetumor_cli.core.io import write_text_atomic

HOME_VARIABLE = "FREETUMOR_HOME"
RECORD = "weights.json"


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


def weights_home(home: str | os.PathLike[str] | None = None) -> Path:
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
    home: str | os.PathLike[str] | None = None,
    revision: str = "main",
    token: str | None = None,
    on_file_done: Callable[[str, str], None] | None = None,
) -> FetchedWeights:
    """Download (resuming) and convert the released files ``names`` (all when None) into the cache.

    Raises:
        ConfigError: an unknown name. HubError: the hub unreachable, a file missing or damaged, or an
        incomplete cache offline.
    """
    root = weights_home(home)
    chosen = [RELEASED[n] for n in _check_names(names)]
    result = FetchedWeights(root)
    record = _read_record(root)
    files: dict[str, Any] = dict(record.get("files") or {})
    if hub_offline():
        for w in chosen:
            entry = files.get(w.name)
            path = usable_path(root, w)
            if not entry or not path.exists():
                raise HubError(
                    f"HF_HUB_OFFLINE is set and the cache {root} lacks {w.name} ({w.repo}/{w.path})",
                    hint="unset HF_HUB_OFFLINE to download it, or point --home / FREETUMOR_HOME at a complete cache",
                )
            result.paths[w.name] = path
            result.up_to_date.append(w.name)
        result.offline = True
        return result
    token = token or os.environ.get("HF_TOKEN") or None
    listings: dict[str, Any] = {}
    for w in chosen:
        if w.repo not in listings:
            listings[w.repo] = list_remote(w.repo, revision=revision, token=token, repo_type="model")
        listing = listings[w.repo]
        remote = next((f for f in listing.files if f.path == w.path), None)
        if remote is None:
            raise HubError(f"{w.repo} holds no {w.path} at {revision}", hint="fetch-weights --list shows what it holds")
        downloaded = _download(root, w, remote, listing.commit, token)
        converted = _convert(root, w, remote, files.get(w.name))
        files[w.name] = {
            "repo": w.repo,
            "path": w.path,
            "commit": listing.commit,
            "size": remote.size,
            "digest": remote.digest(),
        }
        write_text_atomic(root / RECORD, json.dumps({"files": files}, indent=1) + "\n")
        result.paths[w.name] = usable_path(root, w)
        if downloaded:
            result.downloaded.append(w.name)
        if converted:
            result.converted.append(w.name)
        if not downloaded and not converted:
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


def _download(root: Path, weights: ReleasedWeights, remote: RemoteFile, commit: str, token: str | None) -> bool:
    """Download the file unless the cache holds it intact; returns whether it was downloaded."""
    target = root / "downloads" / weights.repo / weights.path
    if target.is_file() and content_problem(target, remote) is None:
        return False
    from huggingface_hub import hf_hub_download

    endpoint = hub_endpoint()
    try:
        hf_hub_download(
            weights.repo, weights.path, repo_type="model", revision=commit, local_dir=root / "downloads" / weights.repo,
            token=token, endpoint=endpoint, force_download=target.exists(),
        )  # fmt: skip
    except Exception as exc:  # every failure of the hub client ends here, named and explained
        raise _hub_failure(exc, endpoint, weights.repo, "model") from exc
    problem = content_problem(target, remote)
    if problem is not None:
        target.unlink(missing_ok=True)
        raise HubError(f"the download of {problem}", hint="run fetch-weights again")
    return True


def _convert(root: Path, weights: ReleasedWeights, remote: RemoteFile, previous: Any) -> bool:
    """Convert the downloaded file into freetumor's folder unless it was converted from these bytes."""
    from freetumor_cli.core.checkpoints import convert_released, read_torch_file

    source = root / "downloads" / weights.repo / weights.path
    out = usable_path(root, weights)
    same = isinstance(previous, dict) and previous.get("digest") == remote.digest() and out.exists()
    if same:
        return False
    if weights.kind == "backbone":
        read_torch_file(source)  # checks it reads safely; train-seg --init takes the file itself
        return True
    import shutil

    tmp = out.parent / f".{out.name}.converting"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_released(source, tmp, task=weights.task)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return True
