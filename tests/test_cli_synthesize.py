"""``freetumor synthesize`` end to end through the CLI, including every bad input of the issue."""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.io import load_volume, save_volume
from freetumor_cli.core.phantom import Phantom

from .conftest import flat, oblique_affine


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(runner: CliRunner, *args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


def synthesize_pancreas(runner: CliRunner, case: Path, *args: str | Path) -> object:
    """``synthesize`` into the pancreas of the shared case's organ map (freetumor's scheme)."""
    organs = case / "organs.nii.gz"
    return invoke(
        runner, "synthesize", "--in", case / "ct.nii.gz", "--labels", organs, "--label-scheme", "freetumor",
        "--organ", "pancreas", *args,
    )  # fmt: skip


def test_synthesize_writes_ct_label_json_in_input_geometry(
    runner: CliRunner, phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, labels = phantom_files
    before = digest(image), digest(labels)
    out = tmp_path / "out"
    result = invoke(
        runner,
        "synthesize",
        "--in",
        image,
        "--labels",
        labels,
        "--organ",
        "liver",
        "--size",
        "medium",
        "--seed",
        "3",
        "--out",
        out,
        "--preview",
    )
    assert result.exit_code == 0, result.output
    assert (digest(image), digest(labels)) == before, "the input was modified"
    ct_in, ct_out = nib.load(image), nib.load(out / "case_liver_synthetic.nii.gz")
    lab_out = nib.load(out / "case_liver_synthetic_label.nii.gz")
    for img in (ct_out, lab_out):
        assert img.shape == ct_in.shape
        np.testing.assert_allclose(img.affine, ct_in.affine)
    assert ct_out.get_data_dtype() == ct_in.get_data_dtype() == np.int16
    assert np.issubdtype(lab_out.get_data_dtype(), np.integer)
    labels_out = np.asanyarray(lab_out.dataobj)
    assert set(np.unique(labels_out)) <= {0, 1, 2, 3, 4, 5, 6}
    assert (labels_out == 2).sum() > (np.asanyarray(nib.load(labels).dataobj) == 2).sum()
    changed = np.asanyarray(ct_out.dataobj) != np.asanyarray(ct_in.dataobj)
    assert changed.any() and not (changed & ~np.isin(labels_out, [1, 2])).any()
    meta = json.loads((out / "case_liver_synthetic.json").read_text())
    assert meta["seed"] == 3 and meta["organ"] == "liver" and meta["version"]
    tumor = meta["tumors"][0]
    assert tumor["size_class"] == "medium" and tumor["volume_ml"] > 0 and tumor["mean_hu_change"] < 0
    center = np.array(tumor["center_voxel"])
    np.testing.assert_allclose(ct_in.affine[:3, :3] @ center + ct_in.affine[:3, 3], tumor["center_mm"], atol=0.01)
    assert (out / "case_liver_synthetic_preview.png").stat().st_size > 1000


def test_labels_found_beside_image_by_nnunet_convention(
    runner: CliRunner, phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, labels = phantom_files
    result = invoke(runner, "synthesize", "--in", image, "--organ", "kidney", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert str(labels) in result.output


def test_same_seed_same_bytes_and_copies_numbered(
    runner: CliRunner, phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, _ = phantom_files
    for name in ("a", "b"):
        assert (
            invoke(
                runner,
                "synthesize",
                "--in",
                image,
                "--organ",
                "liver",
                "--seed",
                "5",
                "--copies",
                "2",
                "--out",
                tmp_path / name,
            ).exit_code
            == 0
        )
    a = load_volume(tmp_path / "a" / "case_liver_synthetic_001.nii.gz").array
    b = load_volume(tmp_path / "b" / "case_liver_synthetic_001.nii.gz").array
    c = load_volume(tmp_path / "a" / "case_liver_synthetic_002.nii.gz").array
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    meta = json.loads((tmp_path / "a" / "case_liver_synthetic_002.json").read_text())
    assert meta["seed"] == 5 and meta["stream"] == [5, zlib.crc32(b"case"), 2]


def test_existing_outputs_need_overwrite(runner: CliRunner, phantom_files: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = phantom_files
    args = ("synthesize", "--in", image, "--organ", "liver", "--out", tmp_path / "o")
    assert invoke(runner, *args).exit_code == 0
    stamp = (tmp_path / "o" / "case_liver_synthetic.nii.gz").stat().st_mtime_ns
    again = invoke(runner, *args)  # a rerun with the same settings: the case is done
    assert again.exit_code == 0 and "already done" in again.output and "wrote 0 output set(s)" in again.output
    other = invoke(runner, *args, "--seed", "1")  # other settings would replace the first run's files
    assert other.exit_code != 0 and "--overwrite" in other.output
    assert (tmp_path / "o" / "case_liver_synthetic.nii.gz").stat().st_mtime_ns == stamp
    assert invoke(runner, *args, "--seed", "1", "--overwrite").exit_code == 0
    kidney = invoke(runner, "synthesize", "--in", image, "--organ", "kidney", "--out", tmp_path / "o")
    assert kidney.exit_code == 0 and (tmp_path / "o" / "case_kidney_synthetic.nii.gz").is_file()  # no collision


def test_folder_and_datalist_batches(runner: CliRunner, small_phantom: Phantom, tmp_path: Path) -> None:
    images, labels = tmp_path / "imgs", tmp_path / "labs"
    for name in ("p1", "p2"):
        save_volume(small_phantom.ct.array, small_phantom.ct, images / f"{name}_0000.nii.gz")
        save_volume(small_phantom.labels.array, small_phantom.ct, labels / f"{name}.nii.gz", label=True)
    result = invoke(
        runner,
        "synthesize",
        "--in",
        images,
        "--labels",
        labels,
        "--organ",
        "pancreas",
        "--size",
        "small",
        "--out",
        tmp_path / "o1",
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "o1").glob("*_synthetic.nii.gz")) == [
        "p1_pancreas_synthetic.nii.gz",
        "p2_pancreas_synthetic.nii.gz",
    ]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "imgs/p1_0000.nii.gz", "label": "labs/p1.nii.gz"}]}))
    result = invoke(runner, "synthesize", "--in", datalist, "--organ", "kidney", "--out", tmp_path / "o2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o2" / "p1_kidney_synthetic_label.nii.gz").is_file()


def test_batch_continues_past_a_bad_case_and_fails_at_the_end(
    runner: CliRunner, small_phantom: Phantom, tmp_path: Path
) -> None:
    images, labels = tmp_path / "imgs", tmp_path / "labs"
    save_volume(small_phantom.ct.array, small_phantom.ct, images / "good.nii.gz")
    save_volume(small_phantom.labels.array, small_phantom.ct, labels / "good.nii.gz", label=True)
    save_volume(small_phantom.ct.array, small_phantom.ct, images / "nolabel.nii.gz")
    result = invoke(
        runner, "synthesize", "--in", images, "--labels", labels, "--organ", "liver", "--out", tmp_path / "o"
    )
    assert result.exit_code == 5  # some cases of the batch failed
    assert "nolabel" in result.output
    assert (tmp_path / "o" / "good_liver_synthetic.nii.gz").is_file()
    assert not list((tmp_path / "o").glob("nolabel*"))


def _bad_inputs(tmp: Path, phantom: Phantom) -> dict[str, tuple[list[str], str]]:
    ct, lab = phantom.ct, phantom.labels
    good_ct = save_volume(ct.array, ct, tmp / "ct.nii.gz")
    good_lab = save_volume(lab.array, ct, tmp / "lab.nii.gz", label=True)
    cases: dict[str, tuple[list[str], str]] = {}
    cases["missing file"] = (["--in", str(tmp / "nope.nii.gz"), "--labels", str(good_lab)], "not found")
    (tmp / "garbage.nii.gz").write_bytes(b"\x1f\x8b garbage")
    cases["unreadable"] = (["--in", str(tmp / "garbage.nii.gz"), "--labels", str(good_lab)], "cannot read")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), tmp / "four_d.nii.gz")
    cases["not 3D"] = (["--in", str(tmp / "four_d.nii.gz"), "--labels", str(good_lab)], "not a 3D volume")
    nib.save(nib.Nifti1Image(lab.array[:-1], ct.affine), tmp / "short.nii.gz")
    cases["shape mismatch"] = (["--in", str(good_ct), "--labels", str(tmp / "short.nii.gz")], "shape")
    moved = ct.affine.copy()
    moved[:3, 3] += 10
    nib.save(nib.Nifti1Image(lab.array, moved), tmp / "moved.nii.gz")
    cases["affine mismatch"] = (["--in", str(good_ct), "--labels", str(tmp / "moved.nii.gz")], "different affines")
    no_liver = np.where(lab.array == 1, 0, lab.array).astype(np.uint8)
    save_volume(no_liver, ct, tmp / "noliver.nii.gz", label=True)
    cases["organ absent"] = (["--in", str(good_ct), "--labels", str(tmp / "noliver.nii.gz")], "no liver")
    nan_ct = ct.array.astype(np.float32)
    nan_ct[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan_ct, ct.affine), tmp / "nan.nii.gz")
    cases["NaN voxels"] = (["--in", str(tmp / "nan.nii.gz"), "--labels", str(good_lab)], "NaN")
    cases["no labels"] = (["--in", str(good_ct)], "no organ labels")
    (tmp / "notes.txt").write_text("hi")
    cases["not NIfTI"] = (["--in", str(tmp / "notes.txt"), "--labels", str(good_lab)], "not NIfTI")
    return cases


@pytest.mark.parametrize(
    "which",
    [
        "missing file",
        "unreadable",
        "not 3D",
        "shape mismatch",
        "affine mismatch",
        "organ absent",
        "NaN voxels",
        "no labels",
        "not NIfTI",
    ],
)
def test_bad_input_one_line_error_nonzero_exit_nothing_written(
    runner: CliRunner, small_phantom: Phantom, tmp_path: Path, which: str
) -> None:
    args, message = _bad_inputs(tmp_path, small_phantom)[which]
    out = tmp_path / "out"
    result = invoke(runner, "synthesize", *args, "--organ", "liver", "--out", out)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not out.exists() or not any(out.iterdir())


def test_wrong_organ_and_wrong_option_values(
    runner: CliRunner, phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    image, _ = phantom_files
    for extra, message in (
        (["--organ", "brain"], "'brain' is not one of 'liver', 'pancreas', 'kidney', 'lung'"),
        (["--organ", "liver", "--count", "0"], "at least 1"),
        (["--organ", "liver", "--size", "huge"], "'huge' is not one of"),
        (["--organ", "liver", "--set", "size=huge"], "size must be one of"),
    ):
        result = invoke(runner, "synthesize", "--in", image, *extra, "--out", tmp_path / "o")
        assert result.exit_code != 0 and message in flat(result.output), result.output


def test_non_ct_intensities_warn(runner: CliRunner, small_phantom: Phantom, tmp_path: Path) -> None:
    scaled = ((small_phantom.ct.array.astype(np.float32) + 1024) / 4096).astype(np.float32)
    image = save_volume(scaled, small_phantom.ct.like(scaled), tmp_path / "mri_like.nii.gz")
    labels = save_volume(small_phantom.labels.array, small_phantom.ct, tmp_path / "lab.nii.gz", label=True)
    result = invoke(
        runner, "synthesize", "--in", image, "--labels", labels, "--organ", "liver", "--out", tmp_path / "o"
    )
    assert result.exit_code == 0
    assert "does not look like CT" in result.output


def test_oblique_anisotropic_input_keeps_its_geometry(
    runner: CliRunner, small_phantom: Phantom, tmp_path: Path
) -> None:
    affine = oblique_affine((1.2, 1.0, 5.0))
    ct = nib.Nifti1Image(small_phantom.ct.array, affine)
    nib.save(ct, tmp_path / "obl.nii.gz")
    nib.save(nib.Nifti1Image(small_phantom.labels.array, affine), tmp_path / "obl_lab.nii.gz")
    result = invoke(
        runner,
        "synthesize",
        "--in",
        tmp_path / "obl.nii.gz",
        "--labels",
        tmp_path / "obl_lab.nii.gz",
        "--label-scheme",
        "freetumor",  # freetumor's values, written by another tool: 1, 3, 5 read two ways
        "--organ",
        "liver",
        "--size",
        "small",
        "--out",
        tmp_path / "o",
    )
    assert result.exit_code == 0, result.output
    for name in ("obl_liver_synthetic.nii.gz", "obl_liver_synthetic_label.nii.gz"):
        out = nib.load(tmp_path / "o" / name)
        np.testing.assert_allclose(out.affine, affine, atol=1e-5)
        assert out.shape == small_phantom.ct.shape


class TestRealCase:
    """The real CT in ../shared/data/totalseg_abdomen (3 mm voxels, TotalSegmentator labels)."""

    @pytest.mark.parametrize(
        ("labels", "organ"),
        [("totalseg_labels", "liver"), ("organs", "liver"), ("totalseg_labels", "kidney"), ("organs", "kidney")],
    )
    def test_liver_and_kidney(
        self, runner: CliRunner, totalseg_case: Path, tmp_path: Path, labels: str, organ: str
    ) -> None:
        ct = totalseg_case / "ct.nii.gz"
        result = invoke(
            runner,
            "synthesize",
            "--in",
            ct,
            "--labels",
            totalseg_case / f"{labels}.nii.gz",
            *(["--label-scheme", "freetumor"] if labels == "organs" else []),
            "--organ",
            organ,
            "--size",
            "small",
            "--count",
            "2",
            "--out",
            tmp_path,
        )
        assert result.exit_code == 0, result.output
        if labels == "totalseg_labels":
            assert "detected the totalsegmentator scheme" in result.output
        src = nib.load(ct)
        out = nib.load(tmp_path / f"ct_{organ}_synthetic.nii.gz")
        np.testing.assert_array_equal(out.affine, src.affine)
        assert out.get_data_dtype() == np.int16
        lab = np.asanyarray(nib.load(tmp_path / f"ct_{organ}_synthetic_label.nii.gz").dataobj)
        organs = np.asanyarray(nib.load(totalseg_case / "organs.nii.gz").dataobj)
        value = {"liver": 1, "kidney": 5}[organ]
        np.testing.assert_array_equal(np.where(lab == value + 1, value, lab), organs)
        meta = json.loads((tmp_path / f"ct_{organ}_synthetic.json").read_text())
        assert len(meta["tumors"]) == 2 and all(t["mean_hu_change"] < -10 for t in meta["tumors"])

    def test_large_tumor_in_small_pancreas_refused_clearly(
        self, runner: CliRunner, totalseg_case: Path, tmp_path: Path
    ) -> None:
        result = synthesize_pancreas(runner, totalseg_case, "--size", "large", "--out", tmp_path / "o")
        assert result.exit_code != 0
        assert (
            "too small for a large tumor" in result.output
            and "ml" in result.output
            and "largest size that fits" in result.output
        )
        assert not (tmp_path / "o").exists()

    def test_mix_in_small_pancreas_falls_back(self, runner: CliRunner, totalseg_case: Path, tmp_path: Path) -> None:
        result = synthesize_pancreas(runner, totalseg_case, "--size", "mix", "--count", "3", "--out", tmp_path)
        assert result.exit_code == 0, result.output
        assert "do not fit the pancreas" in result.output

    def test_lung_lesion_with_lung_mask(self, runner: CliRunner, totalseg_case: Path, tmp_path: Path) -> None:
        shutil.copy(totalseg_case / "ct.nii.gz", tmp_path / "ct.nii.gz")
        result = invoke(
            runner,
            "synthesize",
            "--in",
            tmp_path / "ct.nii.gz",
            "--labels",
            totalseg_case / "lung.nii.gz",
            "--organ",
            "lung",
            "--size",
            "tiny",
            "--out",
            tmp_path / "o",
        )
        assert result.exit_code == 0, result.output
        meta = json.loads((tmp_path / "o" / "ct_lung_synthetic.json").read_text())
        assert meta["region"] == "chest" and meta["tumors"][0]["mean_hu_change"] > 0
