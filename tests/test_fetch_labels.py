"""``freetumor fetch-labels`` against a local server speaking the hub protocol (no network)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.io import save_volume
from freetumor_cli.core.phantom import make_phantom

from .conftest import ctrl_c_as_at_a_terminal, flat
from .hub_server import fail_writes_under, serve_hub, silent_hub

REPO = "Luffy503/FreeTumor"


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import gzip

    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


@pytest.fixture(scope="module")
def phantoms() -> list:  # type: ignore[type-arg]
    return [make_phantom((40, 36, 24), (8.0, 8.0, 8.0), seed=s) for s in range(2)]


@pytest.fixture
def repo_files(phantoms: list) -> dict[str, bytes]:  # type: ignore[type-arg]
    files = {"README.md": b"# labels\n", "misc/notes.txt": b"x"}
    for i, p in enumerate(phantoms):
        organs = np.where(np.isin(p.labels.array, [1, 3, 5]), p.labels.array, 0).astype(np.uint8)
        files[f"BTCV/labelsTr/label000{i}.nii.gz"] = nifti_bytes(organs, p.ct.affine)
        files[f"Flare22/FLARE22_{i}.nii.gz"] = nifti_bytes(organs, p.ct.affine)
    return files


@pytest.fixture(autouse=True)
def isolated_hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def fetch(*args: str | Path) -> object:
    return CliRunner().invoke(app, ["fetch-labels", *map(str, args)])


def test_selected_datasets_only_then_idempotent(
    repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "data"
    with serve_hub({REPO: repo_files}) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", dest, "--datasets", "btcv")
        assert result.exit_code == 0, result.output
        assert (dest / "BTCV" / "labelsTr" / "label0001.nii.gz").read_bytes() == repo_files[
            "BTCV/labelsTr/label0001.nii.gz"
        ]
        assert not (dest / "Flare22").exists()
        assert "2 file(s) downloaded" in result.output
        log.clear()
        again = fetch("--dest", dest, "--datasets", "BTCV")
        assert again.exit_code == 0, again.output
        assert "nothing to download" in again.output
        assert not [r for r in log if "/resolve/" in r[1]], "a second run must not download"


def test_all_datasets_and_unknown_files_reported(
    repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_hub({REPO: repo_files}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        listed = fetch("--list")
        assert listed.exit_code == 0, listed.output
        assert "BTCV" in listed.output and "Flare22" in listed.output and "not understood" in listed.output
        result = fetch("--dest", tmp_path / "d")
        assert result.exit_code == 0, result.output
        assert "README.md" in result.output and "not under a known dataset folder" in result.output
        assert (tmp_path / "d" / "Flare22" / "FLARE22_1.nii.gz").is_file()


def test_list_downloads_nothing(repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with serve_hub({REPO: repo_files}) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert fetch("--list").exit_code == 0
    assert not any("/resolve/" in path for _, path in log)
    assert not (tmp_path / "data").exists()


def test_unknown_repository_and_dataset(
    repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve_hub({REPO: repo_files}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", tmp_path / "d", "--repo", "someone/missing")
        assert result.exit_code != 0 and "not found" in result.output and endpoint in result.output
        result = fetch("--dest", tmp_path / "d", "--datasets", "WORD")
        assert result.exit_code != 0 and "not in" in result.output and "BTCV" in result.output
    assert "Traceback" not in result.output


def test_server_down_names_the_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    result = fetch("--dest", tmp_path / "d")
    assert result.exit_code != 0
    assert endpoint in result.output and "HF_HUB_OFFLINE" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_names_escaping_dest_are_refused(
    repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = dict(repo_files)
    evil["BTCV/../../escaped.nii.gz"] = b"evil"
    evil["BTCV/labelsTr/../../../escaped2.nii.gz"] = b"evil"
    dest = tmp_path / "inner" / "data"
    with serve_hub({REPO: evil}) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", dest)
        assert result.exit_code == 0, result.output
        assert "refused" in result.output
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*"))
    assert not any("escaped" in path for _, path in log if "/resolve/" in path)


def test_offline_uses_a_complete_local_copy_only(
    repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "data"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = fetch("--dest", dest)
    assert result.exit_code != 0 and "no complete local copy" in result.output
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with serve_hub({REPO: repo_files}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert fetch("--dest", dest).exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = fetch("--dest", dest)
    assert result.exit_code == 0, result.output
    assert "offline" in result.output and "local copy" in result.output
    (dest / "BTCV" / "labelsTr" / "label0000.nii.gz").unlink()
    result = fetch("--dest", dest)
    assert result.exit_code != 0 and "incomplete" in result.output


def test_fetch_then_prepare_end_to_end(
    repo_files: dict[str, bytes], phantoms: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[type-arg]
    dest = tmp_path / "data"
    with serve_hub({REPO: repo_files}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert fetch("--dest", dest).exit_code == 0
    # The user puts the public CT images beside the labels.
    for i, p in enumerate(phantoms):
        save_volume(p.ct.array, p.ct, dest / "BTCV" / "imagesTr" / f"img000{i}.nii.gz")
        save_volume(p.ct.array, p.ct, dest / "Flare22" / "imagesTr" / f"FLARE22_{i}_0000.nii.gz")
    result = CliRunner().invoke(
        app, ["prepare", "--data-root", str(dest), "--out", str(tmp_path / "prepared"), "--folds", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "4 usable case(s), 0 skipped" in result.output
    records = [json.loads(line) for line in (tmp_path / "prepared" / "manifest.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in records} == {"BTCV", "Flare22"}
    assert all(r["role"] == "organ-only" for r in records)


def test_an_interrupted_download_resumes_with_the_missing_files_only(
    repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "data"
    with serve_hub({REPO: repo_files}) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert fetch("--dest", dest).exit_code == 0
        # As if the first run had stopped before these two files: one missing, one cut short.
        (dest / "Flare22" / "FLARE22_1.nii.gz").unlink()
        data = (dest / "BTCV" / "labelsTr" / "label0000.nii.gz").read_bytes()
        (dest / "BTCV" / "labelsTr" / "label0000.nii.gz").write_bytes(data[: len(data) // 3])
        log.clear()
        result = fetch("--dest", dest)
        assert result.exit_code == 0, result.output
        fetched = sorted(path.rsplit("/", 1)[-1] for method, path in log if method == "GET" and "/resolve/" in path)
        assert fetched == ["FLARE22_1.nii.gz", "label0000.nii.gz"]
    assert (dest / "BTCV" / "labelsTr" / "label0000.nii.gz").read_bytes() == repo_files[
        "BTCV/labelsTr/label0000.nii.gz"
    ]


def zip_bytes(members: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


@pytest.fixture
def archived_repo(repo_files: dict[str, bytes]) -> dict[str, bytes]:
    """The authors' way: one archive per dataset at the top level, a large one split into parts."""
    label = repo_files["BTCV/labelsTr/label0000.nii.gz"]
    other = repo_files["BTCV/labelsTr/label0001.nii.gz"]
    amos = zip_bytes({f"labelsTr/amos_{i:04d}.nii.gz": d for i, d in enumerate((label, other, label))})
    third = -(-len(amos) // 3)
    return {
        "README.md": b"# labels\n",
        "BTCV.zip": zip_bytes({"BTCV/labelsTr/label0000.nii.gz": label, "BTCV/labelsTr/label0001.nii.gz": other}),
        "Flare22.tar.gz": tar_bytes({"FLARE22_0.nii.gz": label, "FLARE22_1.nii.gz": other}),
        **{f"Amos2022.zip.{k + 1:03d}": amos[k * third : (k + 1) * third] for k in range(3)},
        "Covid19_20/Train_lungmask/volume-covid19-A-0_seg.nii.gz": label,
    }


def test_archives_per_dataset_split_parts_and_nested_folders(
    archived_repo: dict[str, bytes], repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "data"
    with serve_hub({REPO: archived_repo}) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        listed = fetch("--list")
        assert listed.exit_code == 0, listed.output
        text = flat(listed.output)
        assert "BTCV.zip" in text and "Amos2022.zip (3 parts" in text and "Flare22.tar.gz" in text
        result = fetch("--dest", dest)
        assert result.exit_code == 0, result.output
        assert "extracted Amos2022.zip: 3 file(s)" in result.output
        log.clear()
        again = fetch("--dest", dest)
        assert again.exit_code == 0 and "extracted" not in again.output, again.output
        assert not [r for r in log if "/resolve/" in r[1]], "a second run must neither download nor extract"
    label = repo_files["BTCV/labelsTr/label0000.nii.gz"]
    assert (dest / "BTCV" / "labelsTr" / "label0000.nii.gz").read_bytes() == label  # the archive held the folder
    assert (dest / "Flare22" / "FLARE22_0.nii.gz").read_bytes() == label  # the archive held only the contents
    assert (dest / "Amos2022" / "labelsTr" / "amos_0002.nii.gz").read_bytes() == label  # parts read as one zip
    assert (dest / "Covid19_20" / "Train_lungmask" / "volume-covid19-A-0_seg.nii.gz").is_file()
    archives = [p for p in (dest / ".freetumor_archives").glob("*") if p.is_file()]
    assert not archives, "extracted archives are removed"
    assert not list(dest.glob(".extract-*"))


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (lambda: zip_bytes({"../escaped.nii.gz": b"x"}), "would leave the destination"),
        (lambda: zip_bytes({"/abs/escaped.nii.gz": b"x"}), "would leave the destination"),
        (lambda: zip_bytes({"labelsTr/a.nii.gz": b"x"}, symlink="labelsTr/link"), "link"),
        (lambda: tar_bytes({"labelsTr/a.nii.gz": b"x"}, symlink="labelsTr/link"), "link"),
        (lambda: zip_bytes({"labelsTr/a.nii.gz": b"x" * 5000})[:-300], "corrupt or incomplete"),
    ],
)
def test_unsafe_or_corrupt_archives_are_refused_whole(
    archive: object, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = archive()  # type: ignore[operator]
    name = "BTCV.tar.gz" if data[:2] == b"\x1f\x8b" else "BTCV.zip"
    dest = tmp_path / "inner" / "data"
    with serve_hub({REPO: {name: data}}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", dest)
    assert result.exit_code == 3 and message in flat(result.output) and name in flat(result.output), result.output
    assert "Traceback" not in result.output
    assert not (dest / "BTCV").exists(), "nothing half-extracted under a final name"
    assert not list(dest.glob(".extract-*")) and not any(p.name.startswith("escaped") for p in tmp_path.rglob("*"))


def test_a_missing_part_and_a_damaged_download_are_errors(
    archived_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gap = {k: v for k, v in archived_repo.items() if k != "Amos2022.zip.002"}
    with serve_hub({REPO: gap}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", tmp_path / "a", "--datasets", "Amos2022")
    assert result.exit_code == 3 and "Amos2022.zip is incomplete: part(s) 002 missing" in flat(result.output)
    bad = bytearray(archived_repo["BTCV.zip"])
    bad[len(bad) // 2] ^= 0xFF  # same size, other content: only the hash sees it
    with serve_hub({REPO: archived_repo}, served={"BTCV.zip": bytes(bad)}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", tmp_path / "b", "--datasets", "BTCV")
    assert result.exit_code != 0 and "BTCV.zip: its sha256 differs from the hub's" in flat(result.output)
    assert not (tmp_path / "b" / "BTCV").exists()


# Faults: an interrupted, killed or faulted download resumes; a silent hub or an unwritable --dest ends in one line.

BIG = "BTCV/labelsTr/label0000.nii.gz"


@pytest.fixture
def big_repo(repo_files: dict[str, bytes]) -> dict[str, bytes]:
    """The repository with one label file large enough that a transfer can be caught half-way."""
    files = dict(repo_files)
    files[BIG] = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    return files


def leftovers(dest: Path, repo: dict[str, bytes]) -> list[str]:
    """Files under ``dest`` that are neither a repository file at its final name nor the fetch record."""
    final = {str(dest / p) for p in repo} | {str(dest / ".freetumor_fetch.json")}
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and str(p) not in final)


def launch(dest: Path, endpoint: str, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home"), "COLUMNS": "200"}
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "freetumor_cli", "fetch-labels", "--dest", str(dest), *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_at_a_terminal
    )


def wait_for_partial(job: subprocess.Popen[str], dest: Path, repo: dict[str, bytes], past: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert job.poll() is None, job.communicate()
        if any((dest / p).stat().st_size > past for p in leftovers(dest, repo) if (dest / p).is_file()):
            return
        time.sleep(0.02)
    raise AssertionError("no partial file grew")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_stops_a_transfer_at_once_and_the_rerun_resumes_it(
    big_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_number: int
) -> None:
    dest = tmp_path / "data"
    pace = {BIG: 0.05}  # 3 MB in 16 KB chunks: about 10 s
    with serve_hub({REPO: big_repo}, pace=pace) as (endpoint, log):
        job = launch(dest, endpoint, tmp_path, "--datasets", "BTCV")
        try:
            wait_for_partial(job, dest, big_repo, 200_000)
            sent = time.monotonic()
            job.send_signal(signal_number)
            job.wait(timeout=30)  # the process's end (the pipes may close later)
            took = time.monotonic() - sent
            out, err = job.communicate(timeout=30)
        finally:
            job.kill()
        assert took < 4, f"{took:.1f} s to stop"
        assert not (dest / BIG).exists(), "nothing half-written under a final name"
        if signal_number != signal.SIGKILL:
            assert job.returncode == 130, (job.returncode, out, err)
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
        pace.clear()
        log.clear()
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", dest, "--datasets", "BTCV")
        assert result.exit_code == 0, result.output
        starts = [start for path, start in log.ranges if path == BIG]
        assert starts and starts[0] > 200_000, f"the rerun did not resume: {log.ranges}"
    assert (dest / BIG).read_bytes() == big_repo[BIG]
    assert not leftovers(dest, {p: b for p, b in big_repo.items() if p.startswith("BTCV/")})


def test_a_hub_that_never_answers_ends_in_one_line_within_the_timeout(tmp_path: Path) -> None:
    with silent_hub() as endpoint:
        started = time.monotonic()
        job = launch(tmp_path / "d", endpoint, tmp_path, "--timeout", "1")
        try:
            out, err = job.communicate(timeout=30)
        finally:
            job.kill()
        took = time.monotonic() - started
    assert job.returncode == 4, (out, err)
    assert took < 15, f"{took:.1f} s"
    text = flat(err)
    assert "did not answer within 1 s" in text and endpoint in text and "--timeout" in text, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err


def test_a_hub_that_stops_sending_mid_file_is_named_with_the_file(
    big_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "data"
    monkeypatch.setenv("FREETUMOR_HUB_TIMEOUT", "1")
    with serve_hub({REPO: big_repo}, pace={BIG: 30.0}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        started = time.monotonic()
        result = fetch("--dest", dest, "--datasets", "BTCV")
        took = time.monotonic() - started
    assert result.exit_code == 4 and took < 15, (took, result.output)
    text = flat(result.output)
    assert "did not answer within 1 s" in text and BIG in text and "Traceback" not in result.output, text
    assert not (dest / BIG).exists()


@pytest.mark.parametrize("fault", ["reset", "truncate", "500"])
def test_a_hub_fault_mid_transfer_is_one_line_naming_the_file_and_the_rerun_resumes(
    big_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    dest = tmp_path / "data"
    faults = {BIG: fault}
    with serve_hub({REPO: big_repo}, faults=faults) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        started = time.monotonic()
        result = fetch("--dest", dest, "--datasets", "BTCV")
        assert result.exit_code == 4 and time.monotonic() - started < 10, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and BIG in flat(result.output) and "Traceback" not in result.output, result.output
        assert not (dest / BIG).exists()
        faults.clear()
        log.clear()
        again = fetch("--dest", dest, "--datasets", "BTCV")
        assert again.exit_code == 0, again.output
        if fault != "500":  # half the file came in: the rerun asks for the rest only
            starts = [start for path, start in log.ranges if path == BIG]
            assert starts and starts[0] > 0, log.ranges
    assert (dest / BIG).read_bytes() == big_repo[BIG]
    assert not leftovers(dest, {p: b for p, b in big_repo.items() if p.startswith("BTCV/")})


@pytest.mark.parametrize("fault", ["reset", "500"])
def test_a_hub_fault_mid_listing_is_one_line(
    repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    faults = {"tree": fault}
    with serve_hub({REPO: repo_files}, faults=faults, page_size=2) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        started = time.monotonic()
        result = fetch("--dest", tmp_path / "d")
        assert result.exit_code == 4 and time.monotonic() - started < 10, result.output
        text = flat(result.output)
        assert "listing" in text and endpoint in text and "Traceback" not in result.output, text
        assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
        faults.clear()
        result = fetch("--dest", tmp_path / "d")
        assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "Flare22" / "FLARE22_1.nii.gz").read_bytes() == repo_files["Flare22/FLARE22_1.nii.gz"]


def test_dest_under_a_file_is_named_not_blamed_on_the_hub(
    repo_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with serve_hub({REPO: repo_files}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", a_file / "data")
    assert result.exit_code == 4, result.output
    text = flat(result.output)
    assert f"cannot write in {a_file / 'data'}" in text and "not a directory" in text.lower(), text
    assert "hub" not in text and "Traceback" not in result.output
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_a_full_or_read_only_dest_is_named_and_nothing_half_written_remains(
    big_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    dest = tmp_path / "data"
    dest.mkdir()
    fail_writes_under(monkeypatch, dest, code, after=100_000 if code == errno.ENOSPC else 0)
    with serve_hub({REPO: big_repo}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", dest, "--datasets", "BTCV", "--workers", "1")
    assert result.exit_code == 4, result.output
    text = flat(result.output)
    assert f"cannot write in {dest}" in text and words in text.lower() and "hub" not in text, text
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    assert not [p for p in dest.rglob("*") if p.is_file()], "nothing half-written remains"


def test_a_full_dest_while_extracting_is_named_and_the_rerun_extracts_without_downloading(
    archived_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freetumor_cli.core import archives

    dest = tmp_path / "data"
    copy_member = archives._copy_member
    written: list[Path] = []

    def full_disk(source: object, target: Path) -> int:
        if written:  # the second member finds the disk full
            target.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        written.append(target)
        return copy_member(source, target)  # type: ignore[arg-type]

    with serve_hub({REPO: archived_repo}) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with monkeypatch.context() as patch:
            patch.setattr(archives, "_copy_member", full_disk)
            result = fetch("--dest", dest, "--datasets", "BTCV")
        assert result.exit_code == 4, result.output
        text = flat(result.output)
        assert f"cannot write in {dest / 'BTCV'}: no space left on the device" in text and "corrupt" not in text, text
        assert not (dest / "BTCV").exists() and not list(dest.glob(".extract-*")), "nothing half-extracted"
        log.clear()
        again = fetch("--dest", dest, "--datasets", "BTCV")
        assert again.exit_code == 0 and "extracted BTCV.zip: 2 file(s)" in again.output, again.output
        assert not [r for r in log if "/resolve/" in r[1]], "the verified archive is extracted, not fetched again"


def test_a_second_run_does_not_write_a_file_the_first_is_downloading(
    big_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from freetumor_cli.core.hub import list_remote, partial_path

    dest = tmp_path / "data"
    with serve_hub({REPO: big_repo}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        remote = next(f for f in list_remote(REPO).files if f.path == BIG)
        part = partial_path(dest / BIG, remote)
        part.parent.mkdir(parents=True)
        with part.open("ab") as first:  # as the first run holds it while it downloads
            fcntl.flock(first, fcntl.LOCK_EX)
            first.write(big_repo[BIG][:1000])
            first.flush()
            result = fetch("--dest", dest, "--datasets", "BTCV")
            assert result.exit_code == 4 and "is being downloaded by another run" in flat(result.output), result.output
            assert part.read_bytes() == big_repo[BIG][:1000] and not (dest / BIG).exists()


def test_a_hub_that_ignores_ranges_sends_the_whole_file_and_the_result_is_right(
    big_repo: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "data"
    with serve_hub({REPO: big_repo}, faults={BIG: "truncate"}) as (endpoint, _):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert fetch("--dest", dest, "--datasets", "BTCV").exit_code == 4  # half the file in a partial file
    with serve_hub({REPO: big_repo}, honour_ranges=False) as (endpoint, log):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        result = fetch("--dest", dest, "--datasets", "BTCV")
        assert result.exit_code == 0, result.output
        assert [path for path, start in log.ranges if start > 0] == [BIG], "it asked for the rest"
    assert (dest / BIG).read_bytes() == big_repo[BIG]
    assert not leftovers(dest, {p: b for p, b in big_repo.items() if p.startswith("BTCV/")})
