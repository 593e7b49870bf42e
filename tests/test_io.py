from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from freetumor_cli.core.cases import case_name
from freetumor_cli.core.errors import GeometryError, InputError
from freetumor_cli.core.io import Volume, cast_like, load_volume, save_volume
from freetumor_cli.core.label_maps import check_same_grid

from .conftest import oblique_affine


def test_round_trip_keeps_oblique_affine_dtype_and_values(tmp_path: Path) -> None:
    affine = oblique_affine()
    array = np.random.default_rng(0).integers(-1024, 2000, size=(9, 7, 5)).astype(np.int16)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), src)
    vol = load_volume(src)
    assert vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, [0.7, 0.9, 5.0], atol=1e-5)
    out = save_volume(vol.array, vol, tmp_path / "out.nii.gz")
    back = load_volume(out)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
    assert back.orientation == vol.orientation
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_labels_written_as_integers_without_foreign_extensions(tmp_path: Path) -> None:
    ref = Volume(np.zeros((4, 4, 4), np.int16), oblique_affine())
    labels = np.zeros((4, 4, 4), dtype=np.float64)
    labels[1, 1, 1] = 6
    path = save_volume(labels, ref, tmp_path / "lab.nii.gz", label=True)
    img = nib.load(path)
    assert np.issubdtype(img.get_data_dtype(), np.integer)
    assert len(img.header.extensions) == 0
    assert np.asanyarray(img.dataobj)[1, 1, 1] == 6
    with pytest.raises(ValueError):
        save_volume(labels + 0.5, ref, tmp_path / "bad.nii.gz", label=True)


def test_scaled_integer_input_is_read_as_float_and_written_exactly(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(array, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol = load_volume(tmp_path / "scaled.nii.gz")
    assert vol.array.min() == -1024
    save_volume(cast_like(vol.array, np.int16), vol, tmp_path / "copy.nii.gz")
    np.testing.assert_array_equal(load_volume(tmp_path / "copy.nii.gz").array, vol.array)


def test_four_d_singleton_is_squeezed_and_true_4d_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 1), np.int16), np.eye(4)), tmp_path / "s.nii.gz")
    assert load_volume(tmp_path / "s.nii.gz").shape == (3, 3, 3)
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.int16), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(GeometryError, match="not a 3D volume"):
        load_volume(tmp_path / "t.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((3, 3), np.int16), np.eye(4)), tmp_path / "u.nii.gz")
    with pytest.raises(GeometryError):
        load_volume(tmp_path / "u.nii.gz")


def test_load_errors_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="not NIfTI"):
        load_volume(tmp_path / "x.txt")
    with gzip.open(tmp_path / "broken.nii.gz", "wb") as f:
        f.write(b"not a nifti file at all" * 20)
    with pytest.raises(InputError, match="cannot read"):
        load_volume(tmp_path / "broken.nii.gz")
    with pytest.raises(InputError, match="folder"):
        load_volume(tmp_path)


def test_check_same_grid_tolerates_round_off_only() -> None:
    affine = oblique_affine()
    a = Volume(np.zeros((4, 5, 6)), affine)
    check_same_grid(a, Volume(np.zeros((4, 5, 6)), affine + 1e-6))
    with pytest.raises(GeometryError, match="shape"):
        check_same_grid(a, Volume(np.zeros((4, 5, 7)), affine))
    shifted = affine.copy()
    shifted[0, 3] += 1.5
    with pytest.raises(GeometryError, match="affines"):
        check_same_grid(a, Volume(np.zeros((4, 5, 6)), shifted))


@pytest.mark.parametrize(
    ("name", "case"),
    [("liver_3_0000.nii.gz", "liver_3"), ("ct.nii", "ct"), ("a_0000_b.nii.gz", "a_0000_b"), ("x.nii.gz", "x")],
)
def test_case_name(name: str, case: str) -> None:
    assert case_name(name) == case


def test_cast_like_rounds_and_clips() -> None:
    out = cast_like(np.array([1.6, -40000.0, 40000.0]), np.dtype(np.int16))
    assert out.dtype == np.int16
    assert out.tolist() == [2, -32768, 32767]


def test_gz_output_is_multi_member_deterministic_and_standard(tmp_path: Path) -> None:
    from freetumor_cli.core.gzip_codec import ParallelGzipWriter

    array = np.random.default_rng(1).integers(-1000, 1000, size=(64, 64, 40)).astype(np.int16)
    ref = Volume(array, oblique_affine())
    # Many small members: still one standard file for nibabel and gzip alike.
    multi = tmp_path / "multi.nii.gz"
    with multi.open("wb") as raw, ParallelGzipWriter(raw, chunk_bytes=64 << 10) as stream:
        nib.Nifti1Image(array, ref.affine).to_file_map({"image": nib.FileHolder(fileobj=stream)})
    assert multi.read_bytes().count(b"\x1f\x8b\x08") >= 5
    np.testing.assert_array_equal(np.asanyarray(nib.load(multi).dataobj), array)
    first = save_volume(array, ref, tmp_path / "b.nii.gz").read_bytes()
    second = save_volume(array, ref, tmp_path / "c.nii.gz").read_bytes()
    assert first == second, "the same data must give the same bytes"
    plain = tmp_path / "plain.nii.gz"
    nib.save(nib.Nifti1Image(array, ref.affine), plain)
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(tmp_path / "b.nii.gz").dataobj), np.asanyarray(nib.load(plain).dataobj)
    )


def test_gzipped_reader_handles_members_truncation_nifti2_and_byte_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freetumor_cli.core import gzip_codec
    from freetumor_cli.core.gzip_codec import gunzip_file

    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    affine = oblique_affine()
    # Multi-member gzip (our own writer's output), read back by our reader.
    multi = save_volume(array, Volume(array, affine), tmp_path / "multi.nii.gz")
    loaded = load_volume(multi)
    np.testing.assert_array_equal(loaded.array, array)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-5)
    two = tmp_path / "two.gz"
    two.write_bytes(gzip.compress(b"abc") + b"\x00" * 3 + gzip.compress(b"def" * 50))
    assert gunzip_file(two) == b"abc" + b"def" * 50
    monkeypatch.setattr(gzip_codec, "_GUNZIP_CHUNK", 7)  # members spanning many codec calls
    assert gunzip_file(two) == b"abc" + b"def" * 50
    np.testing.assert_array_equal(load_volume(multi).array, array)
    # NIfTI-2 and a big-endian NIfTI-1, gzipped by nibabel.
    nib.save(nib.Nifti2Image(array, affine), tmp_path / "n2.nii.gz")
    np.testing.assert_array_equal(load_volume(tmp_path / "n2.nii.gz").array, array)
    big = nib.Nifti1Image(array, affine, header=nib.Nifti1Header(endianness=">"))
    nib.save(big, tmp_path / "big.nii.gz")
    assert gunzip_file(tmp_path / "big.nii.gz")[:4] == (348).to_bytes(4, "big")
    np.testing.assert_array_equal(load_volume(tmp_path / "big.nii.gz").array, array)
    # A truncated file and a file that is not gzip at all: one-line input errors.
    data = (tmp_path / "n2.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot read .*truncated"):
        load_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "plain.nii.gz").write_bytes(b"hello" * 80)
    with pytest.raises(InputError, match="not gzip data"):
        load_volume(tmp_path / "plain.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_volume(tmp_path / "empty.nii.gz")
    (tmp_path / "tail.gz").write_bytes(gzip.compress(b"abc") + b"xy")
    with pytest.raises(OSError, match="not gzip data"):
        gunzip_file(tmp_path / "tail.gz")
