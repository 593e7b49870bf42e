"""How CTs are stored on disk survives synthesis, and a file whose header lies is refused before it costs
memory."""

from __future__ import annotations

import gzip
import resource
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.errors import InputError
from freetumor_cli.core.io import load_volume

from .conftest import flat

STORAGE = {
    "int16": (np.int16, None, lambda hu: hu.astype(np.int16)),
    "uint16 with intercept -1024": (np.uint16, (1.0, -1024.0), lambda hu: (hu + 1024).clip(0, 65535).astype(np.uint16)),
    "float32": (np.float32, None, lambda hu: hu.astype(np.float32)),
    "int16 with slope 2": (np.int16, (2.0, -1000.0), lambda hu: np.round((hu + 1000) / 2).astype(np.int16)),
    "int32 with slope 0.5": (np.int32, (0.5, 0.0), lambda hu: (hu * 2).astype(np.int32)),
}


@pytest.mark.parametrize("storage", sorted(STORAGE))
def test_synthesize_keeps_the_inputs_storage_and_changes_only_the_tumors(
    storage: str, totalseg_case: Path, tmp_path: Path
) -> None:
    dtype, scale, encode = STORAGE[storage]
    source = nib.load(totalseg_case / "ct.nii.gz")
    hu = np.asanyarray(source.dataobj).astype(np.int32)
    image = nib.Nifti1Image(encode(hu), source.affine)
    image.header.set_data_dtype(dtype)
    if scale is not None:
        image.header.set_slope_inter(*scale)
    nib.save(image, tmp_path / "ct.nii.gz")
    result = CliRunner().invoke(
        app,
        ["synthesize", "--in", str(tmp_path / "ct.nii.gz"), "--labels", str(totalseg_case / "organs.nii.gz"), "--label-scheme", "freetumor",
         "--organ", "liver", "--size", "small", "--count", "3", "--seed", "2", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    before = nib.load(tmp_path / "ct.nii.gz")
    after = nib.load(tmp_path / "out" / "ct_liver_synthetic.nii.gz")
    label = np.asanyarray(nib.load(tmp_path / "out" / "ct_liver_synthetic_label.nii.gz").dataobj)
    assert after.get_data_dtype() == np.dtype(dtype)
    assert (after.dataobj.slope, after.dataobj.inter) == (before.dataobj.slope, before.dataobj.inter)
    stored_before = np.asanyarray(before.dataobj.get_unscaled())
    stored_after = np.asanyarray(after.dataobj.get_unscaled())
    changed = stored_after != stored_before
    liver = np.asanyarray(nib.load(totalseg_case / "organs.nii.gz").dataobj) == 1
    assert changed.any() and not changed[~liver].any()  # inside the liver only, exactly as stored elsewhere
    assert np.all(np.isin(label[changed], [1, 2]))
    darker = np.asanyarray(after.dataobj, dtype=np.float64) - np.asanyarray(before.dataobj, dtype=np.float64)
    assert -250 < darker[label == 2].mean() < -5  # HU changes of a tumor, not of a misread scaling


def test_the_in_memory_api_keeps_a_scaled_images_storage(totalseg_case: Path) -> None:
    from freetumor_cli import synthesize_tumors

    source = nib.load(totalseg_case / "ct.nii.gz")
    hu = np.asanyarray(source.dataobj).astype(np.int32)
    image = nib.Nifti1Image((hu + 1024).clip(0).astype(np.uint16), source.affine)
    image.header.set_slope_inter(1.0, -1024.0)
    image = nib.Nifti1Image.from_bytes(image.to_bytes())  # as loaded from a file
    out = synthesize_tumors(
        image, nib.load(totalseg_case / "organs.nii.gz"), "liver", seed=1, size="small", label_scheme="freetumor"
    )
    reloaded = nib.Nifti1Image.from_bytes(out.image.to_bytes())
    assert reloaded.get_data_dtype() == np.uint16
    delta = np.asanyarray(reloaded.dataobj, np.float64) - np.asanyarray(image.dataobj, np.float64)
    assert np.count_nonzero(delta) > 0 and np.all(delta[np.asanyarray(out.label.dataobj) == 0] == 0)


def lying_header(path: Path, shape: tuple[int, int, int], *, compressed: bool) -> Path:
    """A NIfTI-1 header claiming ``shape`` int16 voxels, followed by only a few bytes of them."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    data = header.binaryblock + struct.pack("<4b", 0, 0, 0, 0) + b"\x00" * 39
    path.write_bytes(gzip.compress(data) if compressed else data)
    return path


@pytest.mark.parametrize("compressed", [True, False])
def test_a_header_that_claims_more_voxels_than_the_file_holds_is_refused_first(
    tmp_path: Path, compressed: bool, totalseg_case: Path
) -> None:
    path = lying_header(tmp_path / ("ct.nii.gz" if compressed else "ct.nii"), (1024, 1024, 1024), compressed=compressed)
    assert path.stat().st_size < 400
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(InputError, match="truncated or its header is wrong"):
        load_volume(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # far below the 2 GiB it claims
    labels = str(totalseg_case / "organs.nii.gz")
    args = ["synthesize", "--in", str(path), "--labels", labels, "--organ", "liver", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3 and "truncated or its header is wrong" in flat(result.output), result.output
