"""``freetumor fetch-labels`` against a local server speaking the hub protocol (no network)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.io import save_volume
from freetumor_cli.core.phantom import make_phantom

from .conftest import flat
from .hub_server import serve_hub

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
