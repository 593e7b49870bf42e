"""Volume I/O: NIfTI images with their geometry, written atomically and in the input's geometry.

A :class:`Volume` holds the voxel array, its 4×4 voxel-to-world affine (RAS+ millimetres, as nibabel
reports it) and the header it came with. New arrays are made "like" a reference volume, so anything
written for an input carries that input's affine, shape and orientation.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from freetumor_cli.core.errors import FreetumorError, GeometryError, InputError, OutputBusyError, OutputError

try:  # ISA-L deflates about 4 times and inflates about 1.4 times as fast as zlib, in the same format
    from isal.igzip import compress as gzip_compress
    from isal.isal_zlib import decompressobj as gzip_decompressobj
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback where it cannot load
    from gzip import compress as gzip_compress  # type: ignore[assignment]
    from zlib import decompressobj as gzip_decompressobj  # type: ignore[assignment]

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Relative tolerance on affines when comparing an image with its labels: header round-offs in
# real data (float32 qform vs sform) are far below it; a different grid is far above.
AFFINE_TOLERANCE_MM = 1e-3


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

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """World coordinates (mm) of voxel indices, shape ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def case_name(path: str | os.PathLike[str]) -> str:
    """The case id of an image path: the file name without ``.nii.gz``/``.nii`` and a trailing ``_0000``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith("_0000"):
        name = name[: -len("_0000")]
    return name


def is_nifti(path: str | os.PathLike[str]) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


DATALIST_SECTIONS = ("training", "validation", "test", "testing")


def read_datalist(path: str | os.PathLike[str], sections: Sequence[str] = DATALIST_SECTIONS) -> list[dict[str, Any]]:
    """Entries of a MONAI data-list JSON (the given sections, or a bare list), with paths made absolute.

    ``image`` and ``label`` values relative to the file are resolved against its folder; a bare string
    entry is an image path.

    Raises:
        InputError: unreadable JSON or an entry that is not a mapping.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read data list {file}: {exc}") from exc
    if isinstance(data, dict):
        raw = [e for key in sections for e in data.get(key, [])]
    elif isinstance(data, list):
        raw = data
    else:
        raw = []
    entries = []
    for entry in raw:
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise InputError(f"data list {file}: entries must be objects with 'image'/'label', got {entry!r}")
        entry = dict(entry)
        for key in ("image", "label"):
            value = entry.get(key)
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            if value:
                if not isinstance(value, str):
                    raise InputError(f"data list {file}: {key} must be a path, got {value!r}")
                entry[key] = Path(value) if Path(value).is_absolute() else file.parent.absolute() / value
        entries.append(entry)
    return entries


def _nifti_path(path: str | os.PathLike[str], what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found: {path}", hint="check the path")
    if path.is_dir():
        raise InputError(f"{what} path is a folder, expected a NIfTI file: {path}")
    if not is_nifti(path):
        raise InputError(f"{what} file is not NIfTI (.nii or .nii.gz): {path}")
    return path


def load_header(path: str | os.PathLike[str], *, what: str = "image") -> Volume:
    """A volume's geometry and header without its voxels (the array is a read-only view of zeros).

    For writing results on an input's grid without decoding the input.
    """
    path = _nifti_path(path, what)
    try:
        image: Any = nib.load(str(path))
    except Exception as exc:  # nibabel raises many kinds; all mean "cannot read"
        raise InputError(f"cannot read {what} {path}: {exc}".rstrip()) from exc
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise GeometryError(f"{what} {path} is not a 3D volume (shape {shape})", hint="pass a single 3D CT volume")
    zeros = np.broadcast_to(np.zeros((), dtype=image.header.get_data_dtype()), shape)
    return Volume(zeros, _checked_affine(image.affine, path, what, image.header), image.header.copy(), path)


def load_volume(path: str | os.PathLike[str], *, what: str = "image") -> Volume:
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


def check_declared_size(path: str | os.PathLike[str], *, what: str = "image") -> None:
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
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
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


def is_dicom_series(path: str | os.PathLike[str]) -> bool:
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


def load_dicom_series(folder: str | os.PathLike[str], *, what: str = "image") -> Volume:
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


def load_image(path: str | os.PathLike[str], *, what: str = "image") -> Volume:
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


_GUNZIP_CHUNK = 1 << 20  # compressed bytes per codec call: bounds the copy of what follows a member's end


def gunzip_file(path: Path) -> bytes:
    """The decompressed content of a gzip file, all its members (zero padding between them allowed).

    Each codec call takes 1 MB of compressed data and releases the GIL meanwhile, so a file read in a
    thread is not slowed down by work in other threads (the standard reader reacquires the GIL for
    every small block it decompresses, many times more often).

    Raises:
        OSError: not gzip data, or truncated (or the codec's own error for corrupt data).
    """
    data = memoryview(path.read_bytes())
    parts: list[bytes] = []
    member = None
    position = 0
    carried = b""  # data after the end of the previous member
    while position < len(data) or carried:
        if carried:
            chunk: bytes | memoryview = carried
            carried = b""
        else:
            chunk = data[position : position + _GUNZIP_CHUNK]
            position += len(chunk)
        if member is None:
            chunk = bytes(chunk).lstrip(b"\x00")
            if not chunk:
                continue
            start = position - len(chunk)  # the chunk, carried or new, ends at `position`
            if data[start : start + 2] != b"\x1f\x8b":
                raise OSError("not gzip data")
            member = gzip_decompressobj(wbits=31)
        parts.append(member.decompress(chunk))
        if member.eof:
            carried = member.unused_data
            member = None
    if member is not None:
        raise OSError("the gzip data is truncated")
    return b"".join(parts)


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


LABELS_DESCRIP = b"freetumor labels"  # the header of every label map freetumor writes says so


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
    path: str | os.PathLike[str],
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
        if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.rint(array)):
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


class ParallelGzipWriter(io.RawIOBase):
    """A write-only file that gzips in parallel threads, as concatenated gzip members.

    The codec releases the GIL, so chunks compress side by side; members are written in order. A
    multi-member gzip file is standard (RFC 1952) and read by nibabel, ITK and zlib alike. Members carry
    no timestamp: the same data always gives the same bytes.
    """

    def __init__(
        self, raw: io.BufferedIOBase | Any, *, level: int = 1, chunk_bytes: int = 4 << 20, workers: int = 2
    ) -> None:
        super().__init__()
        self._raw = raw
        self._level = level
        self._chunk = chunk_bytes
        self._buffer = bytearray()
        self._position = 0
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._pending: list[Any] = []
        self._workers = workers

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset == self._position:
            return offset
        raise OSError("ParallelGzipWriter only writes forward")

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._buffer += view
        self._position += len(view)
        while len(self._buffer) >= self._chunk:
            self._submit(bytes(self._buffer[: self._chunk]))
            del self._buffer[: self._chunk]
        return len(view)

    def _submit(self, chunk: bytes) -> None:
        self._pending.append(self._pool.submit(gzip_compress, chunk, self._level, mtime=0))
        while len(self._pending) > 2 * self._workers:  # bound the memory held by pending chunks
            self._raw.write(self._pending.pop(0).result())

    def close(self) -> None:
        if self.closed:
            return
        if self._buffer or not self._pending:
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        for future in self._pending:
            self._raw.write(future.result())
        self._pending.clear()
        self._pool.shutdown()
        super().close()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` on success.

    The file gets the permissions the user's umask gives new files (``mkstemp`` makes them private, and so
    do writers that create their own file, such as safetensors).
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{temp_prefix(path.name)}", suffix=f".tmp{suffix}", dir=path.parent)
        os.fchmod(fd, 0o666 & ~process_umask())
        os.close(fd)
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:
            raise output_error(path, exc) from None
        raise
    tmp = Path(tmp_name)
    try:
        yield tmp
        # After the writer: one that replaces the file (safetensors does) leaves a private one behind.
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            raise output_error(path, exc) from None
        raise


TEMP_PREFIX = ".ft-"  # temporary files of atomic writes; remove_stale_temporaries knows them by it
STALE_SECONDS = 3600


def owner_tag() -> str:
    """``<host>.<pid>`` of this process, for temporary names: a later run can then tell the leftovers of a
    killed process (gone) from a write in progress (alive)."""
    return f"{_host()}.{os.getpid()}"


def _host() -> str:
    import socket

    return socket.gethostname().replace(".", "_")[:32] or "host"


def temp_prefix(name: str) -> str:
    """The start of a temporary name for ``name`` (:data:`TEMP_PREFIX`, the name, the owner); the name is cut
    to 100 characters, so a temporary name is never longer than the file system allows where ``name`` fits."""
    return f"{TEMP_PREFIX}{name[:100]}.{owner_tag()}."


def owner_is_gone(name: str) -> bool:
    """Whether a temporary name made by :func:`temp_prefix` (or the store's) belongs to a process of this host
    that no longer runs. Names of other hosts, or without an owner, are not judged (False)."""
    host = _host()
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == host and parts[i + 1].isdigit():
            pid = int(parts[i + 1])
            if pid == os.getpid():
                return False
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except OSError:  # alive, owned by someone else
                return False
            return False
    return False


# The errors of writing a file that are the place's fault, not the program's: each is one line (exit 4).
WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose another --out, then rerun"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose another --out, then rerun"),
    errno.EFBIG: ("the file is too large for the file system", "choose another --out"),
    errno.EROFS: ("the file system is read-only", "choose a folder you can write to"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.ENAMETOOLONG: ("the file name is too long", "use shorter case names or a shorter --out path"),
    errno.EIO: ("an input/output error of the device", "check the disk, then rerun"),
}


def output_error(path: str | os.PathLike[str], exc: OSError) -> OutputError:
    """The one-line error for an :class:`OSError` met while writing ``path``: the real cause, and what to do."""
    reason, hint = WRITE_ERRORS.get(exc.errno or 0, (exc.strerror or type(exc).__name__, "check the output folder"))
    return OutputError(f"cannot write {path}: {reason}", hint=f"{hint}; finished outputs are kept")


def check_name_lengths(paths: Sequence[Path]) -> None:
    """Refuse output names longer than their file system allows, before anything is written.

    Raises:
        OutputError: naming the first such path.
    """
    for path in paths:
        folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
        try:
            limit = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        if len(path.name.encode()) > limit:
            raise output_error(path, OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)))


def _device_is_full(path: Path) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has less than 1 MiB free."""
    import shutil

    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return folder is not None and shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def write_error(path: str | os.PathLike[str], exc: BaseException) -> OutputError | None:
    """The one-line error of a failed write, when the place is at fault (a full disk, a read-only folder):
    from an :class:`OSError`, or from a library that reports the system's error in its message only
    (safetensors: "... (os error 28)"). None when ``exc`` is not such an error."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code is None and _device_is_full(Path(path)):  # torch.save says only "unexpected pos"
        code = errno.ENOSPC
    if code not in WRITE_ERRORS:
        return None
    return output_error(path, exc if isinstance(exc, OSError) else OSError(code, os.strerror(code)))


def write_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write tensors as a ``.safetensors`` file atomically, with the umask's permissions.

    Serialized in memory and written by Python: safetensors' own writer makes its files private (0600)
    and reports a full disk as its own error type.
    """
    from safetensors.torch import save

    path = Path(path)
    data = save(dict(tensors))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def process_umask() -> int:
    """This process's umask (read without changing it where the system tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, then restore it at once
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike[str], *, older_than: float = STALE_SECONDS) -> int:
    """Remove temporary files of atomic writes that a killed run left in ``folder`` (and below).

    A file goes when the process that wrote it is gone (it names its host and process), or when it is
    older than ``older_than`` seconds: a write in progress is never touched.
    """
    import time

    root = Path(folder)
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than
    removed = 0
    for path in root.rglob(f"{TEMP_PREFIX}*"):
        try:
            if path.is_file() and ".tmp" in path.name and (path.stat().st_mtime < cutoff or owner_is_gone(path.name)):
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def writable_folder(path: str | os.PathLike[str], *, what: str = "--out") -> Path:
    """``path`` as an output folder: created if needed; an existing file is a usage error, a place that
    cannot be written (read-only, full, no permission) an environment error that names the cause."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder", hint="choose a folder for the outputs")
    for action, attempt in (("create", _make_folder), ("write to", _probe_write)):
        try:
            attempt(folder)
        except OSError as exc:
            reason, hint = WRITE_ERRORS.get(exc.errno or 0, (exc.strerror or type(exc).__name__, "choose a folder"))
            raise OutputError(f"cannot {action} {what} {folder}: {reason}", hint=hint) from None
    return folder


def _make_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)


def _probe_write(folder: Path) -> None:
    """Write and remove a file: the only test that tells a read-only mount, a full disk or a missing
    permission apart (root passes permission checks that the file system still refuses)."""
    with tempfile.NamedTemporaryFile(prefix=temp_prefix("probe"), suffix=".tmp", dir=folder):
        pass


class OutputLock:
    """Lock ``folder`` while a command writes into it: a second run into the same folder stops at once with
    an error instead of replacing the first one's files.

    The lock is on the folder itself (``flock``), released when the run ends or dies; while it is held,
    ``.freetumor.lock`` in the folder names the run holding it. Entering it also removes what killed runs
    left there (:func:`remove_stale_temporaries`). A folder the lock created is removed again if the run
    wrote nothing into it, so a run refused for bad input leaves no trace.
    """

    NAME = ".freetumor.lock"

    def __init__(self, folder: str | os.PathLike[str], command: str, *, part: tuple[int, int] | None = None) -> None:
        self.folder = Path(folder)
        self.command = command
        self.part = part  # (part id, number of parts): parts of one job share the folder, each locks its own
        self._fd: int | None = None
        self._created = False

    @property
    def _name(self) -> str:
        return self.NAME if self.part is None else f"{self.NAME}.part-{self.part[0]}-of-{self.part[1]}"

    def __enter__(self) -> OutputLock:
        import fcntl

        self._created = not self.folder.exists()
        writable_folder(self.folder)
        if self.part is None:
            fd = os.open(self.folder, os.O_RDONLY)
        else:
            fd = os.open(self.folder / self._name, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                holder = (self.folder / self._name).read_text(encoding="utf-8").strip()
            except OSError:
                holder = "another freetumor run"
            raise OutputBusyError(
                f"{self.folder} is in use by {holder}", hint="wait for it to finish, or choose another --out"
            ) from None
        self._fd = fd
        (self.folder / self._name).write_text(f"freetumor {self.command} (pid {os.getpid()})\n", encoding="utf-8")
        # Nobody else writes here now, unless other parts of the same job do: then only old leftovers go.
        remove_stale_temporaries(self.folder, **({"older_than": 0} if self.part is None else {}))
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            (self.folder / self._name).unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if self._created:
                with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                    self.folder.rmdir()


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line to a log (its folder made if needed); a full disk is a one-line :class:`OutputError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as exc:
        if exc.errno in WRITE_ERRORS:
            raise output_error(path, exc) from None
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def check_same_grid(image: Volume, labels: Volume, *, tolerance_mm: float = AFFINE_TOLERANCE_MM) -> None:
    """Raise :class:`GeometryError` unless ``labels`` lies on ``image``'s voxel grid.

    The affines may differ by ``tolerance_mm`` (relative to the voxel size for the rotation-zoom
    part, absolute in mm for the origin), which absorbs float32 header round-off.
    """
    if image.shape != labels.shape:
        raise GeometryError(
            f"image {image.path} has shape {image.shape} but labels {labels.path} have {labels.shape}",
            hint="the organ mask must be on the CT's voxel grid; resample it with nearest neighbour",
        )
    scale = max(float(np.abs(image.affine[:3, :3]).max()), 1.0)
    diff = np.abs(image.affine - labels.affine)
    if diff[:3, :3].max() > tolerance_mm * scale or diff[:3, 3].max() > max(tolerance_mm * scale, 1e-2):
        raise GeometryError(
            f"image {image.path} and labels {labels.path} have different affines "
            f"(largest difference {diff.max():.4g} mm)",
            hint="the organ mask must be on the CT's voxel grid; resample it with nearest neighbour",
        )
