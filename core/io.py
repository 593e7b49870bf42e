"""Volumes and their formats: NIfTI (and DICOM series) read with their geometry, written in the input's.

A :class:`Volume` holds the voxel array, its 4×4 voxel-to-world affine (RAS+ millimetres, as nibabel
reports it) and the header it came with. New arrays are made "like" a reference volume, so anything
written for an input carries that input's affine, shape and orientation.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from freetumor_cli.core import PathLike
from freetumor_cli.core.errors import FreetumorError, GeometryError, InputError
from freetumor_cli.core.gzip_codec import ParallelGzipWriter, gunzip_file
from freetumor_cli.core.label_maps import LABELS_DESCRIP, integer_problem
from freetumor_cli.core.outputs import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array with its geometry.

    Attributes:
        array: voxel values, shape ``(I, J, K)``.
        affine: voxel-to-world matrix, shape ``(4, 4)``, millimetres.
        header: the NIfTI header the volume was read with (None for volumes made in memory).
        path: where it was read from, if anywhere.
        scale: the (slope, intercept) the file applies to its stored values (``scl_slope``/``scl_inter``;
            ``array`` holds the scaled values), or None when it applies none.
        stored: with ``scale``, the values as stored in the file (its dtype): an output for this input
            keeps them wherever it does not change the image.
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = field(default=None)
    scale: tuple[float, float] | None = None
    stored: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """How messages call it: its path, or that it lives in memory."""
        return str(self.path) if self.path is not None else "(in memory)"

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis (the column norms of the affine), shape ``(3,)``."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    def like(self, array: np.ndarray) -> Volume:
        """A new volume with ``array`` on this volume's grid (same affine and header)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"shape {array.shape} does not match {self.shape}")
        return Volume(array, self.affine.copy(), self.header, None)


def is_nifti(path: PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def _nifti_path(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found: {path}", hint="check the path")
    if path.is_dir():
        raise InputError(f"{what} path is a folder, expected a NIfTI file: {path}")
    if not is_nifti(path):
        raise InputError(f"{what} file is not NIfTI (.nii or .nii.gz): {path}")
    return path


def load_header(path: PathLike, *, what: str = "image") -> Volume:
    """A volume's geometry and header without its voxels (the array is a read-only view of zeros).

    For writing results on an input's grid without decoding the input.
    """
    path = _nifti_path(path, what)
    try:
        image: Any = nib.load(str(path))
    except Exception as exc:  # nibabel raises many kinds; all mean "cannot read"
        raise InputError(f"cannot read {what} {path}: {exc}".rstrip()) from exc
    shape = spatial_shape(image.shape)
    if len(shape) != 3:
        raise GeometryError(f"{what} {path} is not a 3D volume (shape {shape})", hint="pass a single 3D CT volume")
    zeros = np.broadcast_to(np.zeros((), dtype=image.header.get_data_dtype()), shape)
    return Volume(zeros, _checked_affine(image.affine, path, what, image.header), image.header.copy(), path)


def spatial_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` without its trailing axes of length 1 (a 3D volume stored as 4D); a volume is 3D when this is."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_volume(path: PathLike, *, what: str = "image") -> Volume:
    """Read a 3D NIfTI volume.

    Integer data without scaling keeps its dtype; scaled data comes back as float. A 4D volume
    whose extra axes have length 1 is squeezed to 3D.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        what: what the file is, for error messages ("image", "labels", ...).

    Raises:
        InputError: the file is missing, unreadable or not NIfTI.
        GeometryError: the volume is not 3D.
    """
    path = _nifti_path(path, what)
    try:
        image: Any = _load_gzipped_nifti(path) if path.name.endswith(".gz") else nib.load(str(path))
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(f"{what} file is not a NIfTI image: {path}")
        check_data_size(image, path, what)
        array, scale, stored = _scaled_and_stored(image)
    except FreetumorError:
        raise
    except Exception as exc:  # nibabel raises many kinds; all mean "cannot read"
        raise InputError(f"cannot read {what} {path}: {exc}".rstrip()) from exc
    array, stored = _squeezed(array, path, what), None if stored is None else _squeezed(stored, path, what)
    header = image.header.copy()
    return Volume(array, _checked_affine(image.affine, path, what, header), header, path, scale, stored)


def check_declared_size(path: PathLike, *, what: str = "image") -> None:
    """Refuse a NIfTI file too short for the voxels its header declares (reads only its header).

    For readers that allocate the declared array before they read it (MONAI's, nibabel's).

    Raises:
        InputError: the file is truncated or its header is wrong.
    """
    try:
        image: Any = nib.load(str(path))
    except Exception:  # unreadable headers are the reader's to report, in its words
        return
    check_data_size(image, Path(path), what)


def _squeezed(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """A 3D array: trailing axes of length 1 dropped; anything else that is not 3D is refused."""
    array = array.reshape(spatial_shape(array.shape))
    if array.ndim != 3:
        raise GeometryError(
            f"{what} {path} is not a 3D volume (shape {tuple(array.shape)})",
            hint="pass a single 3D CT volume",
        )
    return np.asarray(array)


def _scaled_and_stored(image: Any) -> tuple[np.ndarray, tuple[float, float] | None, np.ndarray | None]:
    """The image's values, its (slope, intercept) when it scales them, and then its stored values.

    nibabel moves a loaded file's ``scl_slope``/``scl_inter`` from the header into the array proxy.
    """
    proxy = image.dataobj
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if not hasattr(proxy, "get_unscaled") or (slope, inter) == (1.0, 0.0):
        return np.asanyarray(proxy), None, None
    stored = np.asanyarray(proxy.get_unscaled())
    return np.asanyarray(proxy), (slope, inter), stored


DEFLATE_MAX_RATIO = 1032  # deflate never expands data more than this: a bound on a .gz file's content


def check_data_size(image: Any, path: Path, what: str) -> None:
    """Refuse a file too short for the voxels its header declares, before any array is allocated for them
    (a 91-byte file whose header claims 2 GB of voxels would otherwise cost that much memory first).

    The image's own bytes are counted when they are in memory or in a plain file; for a ``.gz`` file on
    disk, its size times deflate's largest expansion bounds what it can hold.
    """
    header = image.header
    holder = image.file_map.get("image")
    fileobj = getattr(holder, "fileobj", None) if holder is not None else None
    if isinstance(fileobj, io.BytesIO):
        available = fileobj.getbuffer().nbytes
    elif holder is not None and holder.filename:
        size = os.path.getsize(holder.filename)
        available = size * DEFLATE_MAX_RATIO + 1024 if str(holder.filename).endswith(".gz") else size
    else:
        return
    shape = tuple(int(n) for n in header.get_data_shape())
    needed = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    if available < needed:
        raise InputError(
            f"{what} {path} is truncated or its header is wrong: the header declares {shape} voxels "
            f"({needed / 1e6:.1f} MB), the file holds {available / 1e6:.1f} MB",
            hint="copy the file again, or fix its header",
        )


def is_dicom_series(path: PathLike) -> bool:
    """Whether ``path`` is a folder of DICOM files (the ``DICM`` mark at byte 128) holding no NIfTI."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files or any(is_nifti(p) for p in files):
        return False
    for candidate in files[:8]:
        try:
            with candidate.open("rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def load_dicom_series(folder: PathLike, *, what: str = "image") -> Volume:
    """Read a DICOM series folder as a volume in its world geometry (dicom2nifti, as TotalSegmentator does).

    The series is converted once into a temporary NIfTI (not reoriented: voxels stay in the series'
    order, the affine gives their RAS world positions) and read back; nothing is left on disk.

    Raises:
        InputError: dicom2nifti is not installed, or the series cannot be converted.
    """
    folder = Path(folder)
    try:
        from dicom2nifti import convert_dicom
    except ImportError:
        raise InputError(
            f"{folder} is a DICOM series, and reading DICOM needs dicom2nifti",
            hint='pip install "freetumor[dicom]" (or dicom2nifti), or convert the series to NIfTI first',
        ) from None
    with tempfile.TemporaryDirectory(prefix="freetumor-dicom-") as tmp:
        target = Path(tmp) / "series.nii.gz"
        try:
            convert_dicom.dicom_series_to_nifti(str(folder), str(target), reorient_nifti=False)
        except Exception as exc:  # dicom2nifti raises many kinds; all mean "cannot read this series"
            raise InputError(f"cannot read the DICOM series {folder}: {exc}".rstrip()) from exc
        volume = load_volume(target, what=what)
        array = np.array(volume.array)  # detach from the temporary file before it goes
        stored = None if volume.stored is None else np.array(volume.stored)
    return Volume(array, volume.affine, volume.header, folder, volume.scale, stored)


def load_image(path: PathLike, *, what: str = "image") -> Volume:
    """A NIfTI file, or a DICOM series folder, as a volume."""
    return load_dicom_series(path, what=what) if is_dicom_series(path) else load_volume(path, what=what)


def volume_from(image: Any, affine: Any = None, *, what: str = "image") -> Volume:
    """A volume from a nibabel image, or from an array and its affine (the in-memory API's inputs).

    Raises:
        InputError: neither a nibabel image nor an array with an affine.
        GeometryError: not 3D, or an affine without a real voxel size.
    """
    header, scale, stored = None, None, None
    if isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        array, scale, stored = _scaled_and_stored(image)
        affine = image.affine if affine is None else affine
        header = image.header.copy()
    elif isinstance(image, np.ndarray):
        if affine is None:
            raise InputError(f"the {what} is an array without an affine", hint="pass affine=, or a nibabel image")
        array = image
    else:
        raise InputError(f"the {what} must be a nibabel image or a numpy array, not {type(image).__name__}")
    where = Path(f"(in-memory {what})")
    array, stored = _squeezed(array, where, what), None if stored is None else _squeezed(stored, where, what)
    return Volume(array, _checked_affine(affine, where, what), header, None, scale, stored)


def _stored_zooms_are_zero(path: Path, header: Any) -> bool:
    """Whether the file's own pixdim (before nibabel's silent "0 becomes 1 mm") has a zero voxel size,
    where the affine comes from pixdim (no sform)."""
    import gzip

    if not isinstance(header, nib.Nifti1Header) or int(header["sform_code"]) > 0:
        return False
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb") as handle:
            raw = handle.read(header.sizeof_hdr)
        stored = type(header).from_fileobj(io.BytesIO(raw), check=False)
    except Exception:  # the header was read once already: any trouble here is not a zero zoom
        return False
    return bool(np.any(np.asarray(stored["pixdim"][1:4]) == 0))


def _checked_affine(affine: Any, path: Path, what: str, header: Any = None) -> np.ndarray:
    """The affine of a file, refused when it gives no real voxel size (pixdim 0, NaN, a flat axis)."""
    if header is not None and _stored_zooms_are_zero(path, header):
        raise GeometryError(
            f"{what} {path} has a zero voxel size in its header (pixdim 0)",
            hint="set the real voxel size in the header's pixdim (e.g. with nibabel) before using it",
        )
    matrix = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((matrix[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(matrix)) or np.any(spacing <= 1e-6) or abs(np.linalg.det(matrix[:3, :3])) <= 1e-12:
        raise GeometryError(
            f"{what} {path} has no valid voxel size in its header (spacing {np.round(spacing, 6).tolist()} mm)",
            hint="fix the header's pixdim / sform (e.g. with nibabel) before using it",
        )
    return matrix


def _load_gzipped_nifti(path: Path) -> Any:
    raw = gunzip_file(path)
    size = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    if size not in (348, 540):
        size = int.from_bytes(raw[:4], "big")
    kind = {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(size)
    if kind is None:
        raise OSError("no NIfTI header" if raw else "the file is empty")
    holder = nib.FileHolder(filename=str(path), fileobj=io.BytesIO(raw))
    return kind.from_file_map({"header": holder, "image": holder})


def disk_dtype(volume: Volume) -> np.dtype:
    """The dtype the volume was stored with (its array's dtype for in-memory volumes)."""
    if volume.header is not None:
        return np.dtype(volume.header.get_data_dtype())
    return volume.array.dtype


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to ``dtype``, rounding and clipping to its range for integer types."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def _nifti_image(array: np.ndarray, reference: Volume, *, label: bool) -> nib.Nifti1Image:
    header = reference.header.copy() if reference.header is not None else nib.Nifti1Header()
    if label:
        # A label map needs no intensity scaling, and header extensions from the image (label tables
        # of other tools, for instance) would describe the wrong values.
        header.extensions.clear()
        header["descrip"] = LABELS_DESCRIP
    slope, inter = 1.0, 0.0
    if not label and reference.scale is not None:
        # The input scales its stored values (a uint16 CT with intercept -1024, say): the output keeps its
        # dtype and scaling, and its stored values wherever the image is unchanged.
        array, (slope, inter) = stored_like(array, reference), reference.scale
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, reference.affine, header=header)
    # Arrays arrive already in their stored dtype, so values are written exactly.
    image.header.set_slope_inter(slope, inter)
    return image


def working_copy(volume: Volume) -> np.ndarray:
    """A copy of the volume's values to change, in its memory order: in its stored dtype when the file does
    not scale them, else the scaled values (:func:`stored_like` stores them back)."""
    dtype = disk_dtype(volume)
    if volume.scale is None and volume.array.dtype != dtype:
        return volume.array.astype(dtype, order="K")
    return volume.array.copy(order="K")


def stored_like(values: np.ndarray, reference: Volume) -> np.ndarray:
    """``values`` (scaled, like ``reference.array``) as ``reference`` stores them: ``(value - inter) / slope``
    in its stored dtype, rounded and clipped for integers; voxels equal to the reference's keep its stored
    values exactly."""
    assert reference.scale is not None
    slope, inter = reference.scale
    dtype = disk_dtype(reference)
    if reference.stored is None or reference.stored.shape != values.shape:
        return cast_like((np.asarray(values, dtype=np.float64) - inter) / slope, dtype)
    out = reference.stored.astype(dtype, copy=True, order="K")
    changed = values != reference.array
    out[changed] = cast_like((values[changed].astype(np.float64) - inter) / slope, dtype)
    return out


def label_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.uint8) if max_value <= np.iinfo(np.uint8).max else np.dtype(np.int16)


def save_volume(
    array: np.ndarray,
    reference: Volume,
    path: PathLike,
    *,
    label: bool = False,
) -> Path:
    """Write ``array`` on ``reference``'s grid to ``path`` atomically.

    The file is written to a temporary name in the destination folder and renamed into place, so an
    interrupted run never leaves a half-written file under the final name.

    Args:
        array: values of shape ``reference.shape``; integers for labels.
        reference: the volume whose affine, orientation and header the output takes.
        path: destination, ``.nii.gz`` or ``.nii``.
        label: write as a label map (integer dtype, no scaling, no foreign header extensions).

    Returns:
        The path written.
    """
    path = Path(path)
    if tuple(array.shape) != reference.shape:
        raise GeometryError(f"array shape {array.shape} does not match reference {reference.shape}")
    if not is_nifti(path):
        raise InputError(f"output must end with .nii.gz or .nii: {path}")
    if label:
        if integer_problem(array):
            raise ValueError("label arrays must hold integers")
        max_value = int(array.max()) if array.size else 0
        array = array.astype(label_dtype(max_value), copy=False)
    image = _nifti_image(array, reference, label=label)
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            with tmp.open("wb") as raw, ParallelGzipWriter(raw) as stream:
                image.to_file_map({"image": nib.FileHolder(fileobj=stream)})
        else:
            nib.save(image, str(tmp))
    return path
