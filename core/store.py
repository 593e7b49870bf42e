"""The case store: each case after its region's deterministic preprocessing, read a crop at a time.

Decoding a 512×512×160 CT and resampling it to 1.5 mm takes 5–9 s of a CPU core; a training step needs
a few 96³ crops of it. ``prepare`` therefore writes every case once, preprocessed
(:class:`~freetumor_cli.core.preprocess.Preprocessing`: RAS, spacing, window, foreground crop), and the
training loops read only the crops they sample.

Layout: ``<store>/pp-<digest>/<dataset>/<case>/`` per case, where ``<digest>`` names the preprocessing
(``preprocessing.json`` beside the case folders says what it is):

- ``image.b2nd``: the windowed image, float16 in [0, 1]; ``label.b2nd``: the region's labels, uint8.
  Both are blosc2 arrays (LZ4, 64³ chunks), as nnU-Net v2 stores its preprocessed cases: a crop
  decompresses only the chunks it touches, and the files are about a third of the raw float16 size.
- ``locations.npz``: per label value, up to :data:`MAX_LOCATIONS` voxel indices (a deterministic sample);
  value 0 holds body voxels only (windowed image above 0). Crop sampling needs nothing else.
- ``case.json``: the case's index: shape, the preprocessed grid's affine, the source image's affine and
  shape (to bring predictions back), voxel counts per value, a CRC-32 of every file, and the identity of
  its source files (name, size, modification time). It is written last; the folder appears under its
  final name only when complete.

A case whose source files changed, or whose files are damaged, is never read: :meth:`CaseStore.read`
raises :class:`StoreMiss` and the caller falls back to the raw files; the next ``prepare`` rebuilds it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli import __version__
from freetumor_cli.core import PathLike
from freetumor_cli.core.errors import InputError, OutputError
from freetumor_cli.core.label_maps import label_values
from freetumor_cli.core.outputs import (
    WRITE_ERRORS,
    output_error,
    owner_tag,
    sweep_stale,
    writable_folder,
    write_text_atomic,
)
from freetumor_cli.core.parallel import select_part
from freetumor_cli.core.preprocess import Preprocessing

STORE_FORMAT = 1
MAX_LOCATIONS = 10_000  # per label value, as nnU-Net v2 samples its class locations
CHUNK = 64
FILES = ("image.b2nd", "label.b2nd", "locations.npz")
STALE_TEMP_SECONDS = 3600  # unfinished case folders older than this belong to no running build


class StoreMiss(Exception):
    """A case the store cannot serve: missing, built from other source files, or damaged."""


@dataclass
class CaseData:
    """One case on its preprocessed grid.

    Attributes:
        image: windowed image, shape ``(X, Y, Z)``; a numpy array or a blosc2 array (both slice to numpy).
        label: region-space labels, same shape, uint8.
        affine: voxel-to-world matrix of this grid.
        locations: label value -> ``(n, 3)`` int32 voxel indices (a sample; value 0 is body only).
        counts: label value -> voxels of that value (value 0: body voxels).
        source_affine, source_shape: the source image's grid.
        origin: ``"store"`` or ``"raw"``.
    """

    image: Any
    label: Any
    affine: np.ndarray
    locations: dict[int, np.ndarray]
    counts: dict[int, int]
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    origin: str = "raw"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.image.shape)  # type: ignore[return-value]


def file_identity(path: PathLike) -> dict[str, Any]:
    """What identifies a source file's content cheaply: its name, size and modification time."""
    stat = os.stat(path)
    return {"name": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def source_identity(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of a case's source files (image and label)."""
    return {key: file_identity(entry[key]) for key in ("image", "label")}


def class_locations(
    label: np.ndarray, image: np.ndarray, *, key: str, limit: int = MAX_LOCATIONS
) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """A deterministic sample of each label value's voxel indices, and the voxel count of each value.

    Value 0 counts body voxels only (``image > 0``), as MONAI's positive/negative crop sampling does.

    Args:
        label: labels, shape ``(X, Y, Z)``.
        image: the windowed image, same shape.
        key: names the case; the sample is drawn from a generator seeded by it.
        limit: indices kept per value at most.
    """
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    flat = np.asarray(label).ravel()
    body = np.asarray(image).ravel() > 0
    order = np.argsort(flat, kind="stable")  # one pass groups every value's voxels
    values, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    locations: dict[int, np.ndarray] = {}
    totals: dict[int, int] = {}
    for value, start, count in zip(values.tolist(), starts.tolist(), counts.tolist(), strict=True):
        index = order[start : start + count]
        if value == 0:
            index = index[body[index]]
        totals[int(value)] = int(index.size)
        if index.size > limit:
            index = np.sort(rng.choice(index, size=limit, replace=False))
        locations[int(value)] = np.stack(np.unravel_index(index, label.shape), axis=1).astype(np.int32)
    return locations, totals


def case_key(entry: Mapping[str, Any]) -> str:
    """What seeds a case's location sample: its dataset and case id (the image's name without them)."""
    if entry.get("dataset") and entry.get("case"):
        return f"{entry['dataset']}/{entry['case']}"
    return Path(str(entry["image"])).name


MOVED_HINT = (
    "a prepared folder's paths are relative to it: move it together with the data root, or run freetumor prepare "
    "again (earlier versions wrote paths relative to the folder where prepare ran)"
)


def preprocess_case(entry: Mapping[str, Any], preprocessing: Preprocessing) -> CaseData:
    """Read a case (``image``, optional ``label``) from its files through the preprocessing chain: the raw path."""
    from monai.transforms import Compose

    from freetumor_cli.core.io import check_declared_size

    keys = ("image", "label") if entry.get("label") else ("image",)
    for key in keys:
        if not Path(str(entry[key])).is_file():
            raise InputError(f"{key} file not found: {entry[key]}", hint=MOVED_HINT)
        check_declared_size(entry[key], what=f"{key} of case {case_key(entry)}")
    try:
        data = Compose(preprocessing.transforms(keys))({key: str(entry[key]) for key in keys})
    except RuntimeError as exc:  # MONAI wraps what a reader raised
        cause = exc.__cause__ or exc
        raise InputError(
            f"cannot read case {case_key(entry)} ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})",
            hint="check its files, or leave it out with freetumor prepare --datasets",
        ) from None
    image = np.asarray(data["image"][0], dtype=np.float32)
    label = np.asarray(data["label"][0]).astype(np.uint8) if "label" in keys else np.zeros(image.shape, np.uint8)
    locations, counts = class_locations(label, image, key=case_key(entry))
    meta = data["image"].meta
    return CaseData(
        image=image,
        label=label,
        affine=np.asarray(data["image"].affine, dtype=np.float64),
        locations=locations,
        counts=counts,
        source_affine=np.asarray(meta["original_affine"], dtype=np.float64),
        source_shape=tuple(int(n) for n in np.asarray(meta["spatial_shape"]).tolist()),  # type: ignore[arg-type]
        origin="raw",
    )


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


class CaseStore:
    """The store of one preprocessing: ``<root>/pp-<digest>``.

    Args:
        root: the store folder (``prepared/store`` unless ``prepare --store-dir`` put it elsewhere).
        preprocessing: the preprocessing its cases went through.
    """

    def __init__(self, root: PathLike, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing
        self.folder = Path(root) / f"pp-{preprocessing.digest()}"

    def __repr__(self) -> str:
        return f"CaseStore({str(self.folder)!r})"

    def exists(self) -> bool:
        return (self.folder / "preprocessing.json").is_file()

    def case_folder(self, entry: Mapping[str, Any]) -> Path:
        dataset, case = str(entry["dataset"]), str(entry["case"])
        for part in (dataset, case):
            if not part or part.startswith(".") or "/" in part or "\\" in part:
                raise ValueError(f"not a safe store name: {part!r}")
        return self.folder / dataset / case

    # Reading -----------------------------------------------------------------------------------

    def index(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """The case's ``case.json``, checked against the entry's source files (raises :class:`StoreMiss`)."""
        folder = self.case_folder(entry)
        try:
            index = json.loads((folder / "case.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreMiss(f"{entry['dataset']}/{entry['case']} is not in the store") from None
        except (OSError, ValueError) as exc:
            raise StoreMiss(f"{entry['dataset']}/{entry['case']}: unreadable case.json ({exc})") from None
        if index.get("format") != STORE_FORMAT or index.get("digest") != self.preprocessing.digest():
            raise StoreMiss(f"{entry['dataset']}/{entry['case']}: written by another store format or preprocessing")
        try:
            current = source_identity(entry)
        except OSError as exc:
            raise StoreMiss(f"{entry['dataset']}/{entry['case']}: source file unavailable ({exc})") from None
        if index.get("source") != current:
            raise StoreMiss(f"{entry['dataset']}/{entry['case']}: its source files changed since the store was built")
        return index

    def read(self, entry: Mapping[str, Any]) -> CaseData:
        """The case's arrays, opened for crop reads (nothing is decompressed until sliced).

        Raises:
            StoreMiss: missing, stale or damaged; the caller reads the raw files instead.
        """
        import blosc2

        index = self.index(entry)
        folder = self.case_folder(entry)
        shape = tuple(index["shape"])
        try:
            image = blosc2.open(str(folder / "image.b2nd"), mode="r", dparams={"nthreads": 1})
            label = blosc2.open(str(folder / "label.b2nd"), mode="r", dparams={"nthreads": 1})
            with np.load(folder / "locations.npz") as npz:
                locations = {int(k[1:]): npz[k] for k in npz.files}
        except Exception as exc:  # blosc2 and numpy raise many kinds for damaged files
            raise StoreMiss(f"{entry['dataset']}/{entry['case']}: damaged store files ({type(exc).__name__})") from None
        if tuple(image.shape) != shape or tuple(label.shape) != shape or image.dtype != np.float16:
            raise StoreMiss(f"{entry['dataset']}/{entry['case']}: store arrays do not match case.json")
        return CaseData(
            image=image,
            label=label,
            affine=np.asarray(index["affine"], dtype=np.float64),
            locations=locations,
            counts={int(k): int(v) for k, v in index["counts"].items()},
            source_affine=np.asarray(index["source_affine"], dtype=np.float64),
            source_shape=tuple(index["source_shape"]),
            origin="store",
        )

    def verify(self, entry: Mapping[str, Any]) -> str | None:
        """Why the stored case cannot be used (missing, stale, damaged: checksums included), or None."""
        try:
            index = self.index(entry)
        except StoreMiss as exc:
            return str(exc)
        folder = self.case_folder(entry)
        for name in FILES:
            path = folder / name
            if not path.is_file() or _crc32(path) != index.get("crc32", {}).get(name):
                return f"{entry['dataset']}/{entry['case']}: {name} is damaged (checksum)"
        return None

    # Writing -----------------------------------------------------------------------------------

    def write(self, entry: Mapping[str, Any], data: CaseData) -> Path:
        """Store one case atomically: written in a temporary folder, renamed when complete."""
        import blosc2

        final = self.case_folder(entry)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}.{owner_tag()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            chunks = tuple(min(CHUNK, n) for n in data.shape)
            cparams = {"codec": blosc2.Codec.LZ4, "clevel": 5, "nthreads": 1}
            for name, array, dtype in (("image.b2nd", data.image, np.float16), ("label.b2nd", data.label, np.uint8)):
                # Compressed in memory, written by Python: a full disk is then an OSError that says so
                # (blosc2 writing its own file reports only "Error while creating the NDArray").
                frame = blosc2.asarray(np.ascontiguousarray(array, dtype=dtype), chunks=chunks, cparams=cparams)
                (tmp / name).write_bytes(frame.to_cframe())
            with (tmp / "locations.npz").open("wb") as handle:
                np.savez(handle, **{f"v{k}": v for k, v in data.locations.items()})  # type: ignore[arg-type]
            index = {
                "format": STORE_FORMAT,
                "version": __version__,
                "digest": self.preprocessing.digest(),
                "dataset": entry["dataset"],
                "case": entry["case"],
                "shape": list(data.shape),
                "affine": np.asarray(data.affine).tolist(),
                "source_affine": np.asarray(data.source_affine).tolist(),
                "source_shape": list(data.source_shape),
                "counts": {str(k): v for k, v in data.counts.items()},
                "source": source_identity(entry),
                "crc32": {name: _crc32(tmp / name) for name in FILES},
            }
            (tmp / "case.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
            if final.exists():  # a stale or damaged case: move it aside, then replace it
                old = final.parent / f".old-{final.name}.{owner_tag()}.{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
                raise output_error(final, exc) from None
            raise
        return final

    def describe(self) -> None:
        """Write ``preprocessing.json`` (what the digest means) unless it is there."""
        writable_folder(self.folder, what="the case store")
        path = self.folder / "preprocessing.json"
        if not path.is_file():
            from dataclasses import asdict

            write_text_atomic(path, json.dumps({"format": STORE_FORMAT, **asdict(self.preprocessing)}, indent=2) + "\n")

    def remove_stale_temporaries(self) -> int:
        """Remove unfinished case folders left by killed builds; returns how many.

        A folder goes when the process that wrote it is gone (its name says which process of which host),
        or when it is older than an hour (a build on another machine that shares the store)."""
        if not self.folder.is_dir():
            return 0
        return sweep_stale(
            (
                item
                for dataset in self.folder.iterdir()
                if dataset.is_dir()
                for item in dataset.iterdir()
                if item.name.startswith((".tmp-", ".old-"))
            ),
            STALE_TEMP_SECONDS,
        )


@dataclass
class BuildResult:
    """What one build (or one part of it) did."""

    built: int = 0
    reused: int = 0
    rebuilt: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0


def _build_job(args: tuple[str, dict[str, Any], Preprocessing]) -> tuple[str, str, int, str | None]:
    root, entry, preprocessing = args
    store = CaseStore.__new__(CaseStore)
    store.preprocessing, store.folder = preprocessing, Path(root)
    name = f"{entry['dataset']}/{entry['case']}"
    problem = store.verify(entry)
    if problem is None:
        return name, "reused", _folder_bytes(store.case_folder(entry)), None
    missing = "is not in the store" in problem
    try:
        data = preprocess_case(entry, preprocessing)
        folder = store.write(entry, data)
    except OutputError:  # the store's disk, not the case: nothing else can be stored either
        raise
    except Exception as exc:  # a case that cannot be read is reported, the others go on
        return name, "failed", 0, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return name, "built" if missing else "rebuilt", _folder_bytes(folder), None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def build_store(
    records: Iterable[Mapping[str, Any]],
    root: PathLike,
    preprocessing_of: Callable[[str], Preprocessing],
    *,
    workers: int = 1,
    num_parts: int = 1,
    part_id: int = 0,
    on_start: Callable[[int], None] | None = None,
    on_case_done: Callable[[str, str], None] | None = None,
) -> BuildResult:
    """Store every case of ``records`` (manifest records) that is missing, stale or damaged.

    Resumable: complete, unchanged cases are verified (checksums) and kept. With ``num_parts`` > 1
    only part ``part_id`` is built, so that array jobs on several machines share the work.

    Args:
        records: manifest records (``dataset``, ``case``, ``image``, ``label``, ``region``).
        root: the store folder.
        preprocessing_of: region name -> its preprocessing.
        workers: processes.
        num_parts, part_id: which share of the records this call builds.
        on_start: called with the number of cases of this part.
        on_case_done: called with each case's name and what happened (reused, built, rebuilt, failed).
    """
    from freetumor_cli.core.parallel import process_pool

    started = time.perf_counter()
    mine = select_part(list(records), num_parts, part_id)
    stores: dict[str, CaseStore] = {}
    jobs = []
    for record in mine:
        region = str(record["region"])
        if region not in stores:
            stores[region] = CaseStore(root, preprocessing_of(region))
            stores[region].describe()
            stores[region].remove_stale_temporaries()
        jobs.append((str(stores[region].folder), dict(record), stores[region].preprocessing))
    if on_start:
        on_start(len(jobs))
    result = BuildResult()
    pool = process_pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        outcomes = pool.map(_build_job, jobs) if pool else map(_build_job, jobs)
        for name, what, size, error in outcomes:
            if what == "failed":
                result.failed[name] = error or "unknown error"
            else:
                setattr(result, what, getattr(result, what) + 1)
                result.bytes += size
            if on_case_done:
                on_case_done(name, what)
    finally:
        if pool:
            pool.shutdown()
    result.seconds = time.perf_counter() - started
    return result


STORE_POINTER = "store.json"


def store_root(prepared: PathLike) -> Path:
    """The store folder of a prepared folder: ``store/`` inside it, or where ``store.json`` points."""
    prepared = Path(prepared)
    pointer = prepared / STORE_POINTER
    if pointer.is_file():
        try:
            target = Path(json.loads(pointer.read_text(encoding="utf-8"))["path"])
        except (OSError, ValueError, KeyError):
            return prepared / "store"
        return target if target.is_absolute() else prepared / target
    return prepared / "store"


def open_store(prepared: PathLike, preprocessing: Preprocessing) -> CaseStore | None:
    """The prepared folder's store of ``preprocessing``, or None when there is none."""
    store = CaseStore(store_root(prepared), preprocessing)
    return store if store.exists() else None


def stored_values(
    case: CaseData, index: Any, *, read: Callable[[Any, Any], np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``case``'s image (float32) and labels (uint8) at ``index`` (a tuple of slices, or ``...``).

    A stored case is checked as it is read: a chunk that does not decode, or that decodes to values a
    stored case cannot hold (an image outside [0, 1], a label value its index does not count), raises
    :class:`StoreMiss` (the caller reads the raw files instead). ``read(array, index)`` replaces plain
    slicing (to pad a crop that leaves the case, say).
    """
    read = read or (lambda array, where: np.asarray(array[where]))
    try:
        image = np.asarray(read(case.image, index), dtype=np.float32)
        label = np.asarray(read(case.label, index))
    except Exception as exc:  # blosc2 raises several kinds for chunks it cannot decode
        if case.origin != "store":
            raise
        raise StoreMiss(f"undecodable chunk ({type(exc).__name__})") from None
    if case.origin == "store":
        low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
        if not (low >= 0.0 and high <= 1.0):  # NaN fails both comparisons
            raise StoreMiss(f"image values outside [0, 1] ({low:g} .. {high:g})")
        unknown = sorted(set(label_values(np.asarray(label, dtype=np.uint8)).tolist()) - set(case.counts) - {0})
        if unknown:
            raise StoreMiss(f"label values {unknown[:5]} the case does not have")
    return image, label


class CaseSource:
    """Where a training or evaluation loop gets its cases: the store when it has them, else the raw files.

    Args:
        preprocessing: the loop's preprocessing.
        store: a store of that preprocessing, or None.
    """

    def __init__(self, preprocessing: Preprocessing, store: CaseStore | None) -> None:
        if store is not None and store.preprocessing != preprocessing:
            raise ValueError("the store was built with another preprocessing")
        self.preprocessing = preprocessing
        self.store = store

    def load(self, entry: Mapping[str, Any]) -> CaseData:
        if self.store is not None and "dataset" in entry and "case" in entry:
            try:
                return self.store.read(entry)
            except StoreMiss:
                pass
        return self.load_raw(entry)

    def load_raw(self, entry: Mapping[str, Any]) -> CaseData:
        """The case from its raw files (for a stored case found damaged while it was read)."""
        return preprocess_case(entry, self.preprocessing)

    def whole(self, entry: Mapping[str, Any]) -> tuple[CaseData, np.ndarray, np.ndarray]:
        """The case, its whole image (float32) and its labels; a stored case found damaged is read raw."""
        case = self.load(entry)
        try:
            return case, *stored_values(case, ...)
        except StoreMiss:
            case = self.load_raw(entry)
            return case, *stored_values(case, ...)

    def describe(self) -> str:
        """One line for the run's log: which path the data comes from."""
        if self.store is None:
            p = self.preprocessing
            return (
                f"raw files: no case store at {list(p.spacing_mm)} mm, window {list(p.window_hu)} HU, so every sample "
                f"decodes and resamples its CT (freetumor prepare builds one; --set "
                f"preprocessing.{p.region}_spacing_mm=[{','.join(f'{s:g}' for s in p.spacing_mm)}] for this grid)"
            )
        return f"case store {self.store.folder} (cases missing or stale there are read from their raw files)"
