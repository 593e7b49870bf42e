"""Safe extraction of the archives a hub repository holds: ``.zip``, ``.tar``/``.tar.gz``/``.tgz``, and
archives split into numbered parts (``Flare23.zip.001`` … ``.016``, read as one file without joining
them on disk).

No member may leave the destination: absolute names, ``..``, drive letters, links and device files are
refused, and the whole archive with them. Extraction goes to a temporary folder beside the destination
and is renamed into place only when every member was read back intact (zip CRCs, gzip checksums), so
an interrupted or corrupt extraction leaves nothing under a final name.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from freetumor_cli.core.errors import InputError

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
# Errors of writing the extracted files that a full, read-only or forbidden destination causes.
DESTINATION_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
PART = re.compile(r"^(?P<archive>.+\.(zip|tar\.gz|tgz|tar))\.(?P<number>\d{1,4})$")


class ArchiveError(InputError):
    """An archive that is corrupt, incomplete or unsafe."""


def archive_name(path: str) -> tuple[str, int | None] | None:
    """(the archive's name, the part number or None) of an archive file name, or None if it is no archive.

    ``BTCV.zip`` -> ("BTCV.zip", None); ``Flare23.zip.003`` -> ("Flare23.zip", 3).
    """
    name = PurePosixPath(path).name
    match = PART.match(name)
    if match:
        return match["archive"], int(match["number"])
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return name, None
    return None


def archive_stem(name: str) -> str:
    """``Flare23.zip`` -> ``Flare23``; ``BTCV.tar.gz`` -> ``BTCV``."""
    lower = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_parts(name: str, numbers: Sequence[int]) -> None:
    """The parts of a split archive must be numbered without gaps from 0 or 1."""
    ordered = sorted(numbers)
    start = ordered[0]
    if start not in (0, 1) or ordered != list(range(start, start + len(ordered))):
        missing = sorted(set(range(1 if start else 0, ordered[-1] + 1)) - set(ordered))
        raise ArchiveError(
            f"the split archive {name} is incomplete: part(s) {', '.join(f'{m:03d}' for m in missing) or '001'} missing",
            hint="download the missing parts (fetch-labels resumes) or check the repository listing",
        )


class JoinedParts(io.RawIOBase):
    """The parts of a split archive read as one seekable file (nothing is copied)."""

    def __init__(self, parts: Sequence[Path]) -> None:
        super().__init__()
        self._files = [p.open("rb") for p in parts]
        self._sizes = [p.stat().st_size for p in parts]
        self._starts = [sum(self._sizes[:i]) for i in range(len(parts))]
        self._size = sum(self._sizes)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._position < self._size:
            index = max(i for i, s in enumerate(self._starts) if s <= self._position)
            handle = self._files[index]
            handle.seek(self._position - self._starts[index])
            want = min(len(view) - done, self._starts[index] + self._sizes[index] - self._position)
            got = handle.readinto(view[done : done + want])
            if not got:
                break
            done += got
            self._position += got
        return done

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        super().close()


def _safe_member(name: str, archive: str) -> PurePosixPath:
    from freetumor_cli.core.hub import safe_relative_path

    relative = safe_relative_path(name.rstrip("/"))
    if relative is None:
        raise ArchiveError(
            f"{archive} holds a member that would leave the destination: {name!r}", hint="the archive is refused whole"
        )
    return relative


def _copy_member(source: io.BufferedIOBase, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    return target.stat().st_size


def extract_archive(
    parts: Sequence[Path],
    destination: Path,
    *,
    strip: Callable[[list[str]], str | None] | None = None,
    name: str | None = None,
    on_member: Callable[[str], None] | None = None,
) -> list[Path]:
    """Extract an archive (one file, or the ordered parts of a split one) safely into ``destination``.

    Members go to a temporary folder beside ``destination``; ``strip`` may name a single top-level
    folder whose contents are the payload (an archive that holds its dataset's folder). The payload is
    then moved in: the folder is renamed into place when ``destination`` does not exist yet, else its
    files are moved in one by one (files already there are kept).

    Returns:
        The files now in ``destination`` that came from the archive.

    Raises:
        ArchiveError: unsafe member names, links, a corrupt or truncated archive.
        OSError: the destination cannot be written (full, read-only); nothing of the archive stays in it.
    """
    name = name or parts[0].name
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".extract-{destination.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        handle: io.IOBase = JoinedParts(parts) if len(parts) > 1 else parts[0].open("rb")
        with handle:
            lower = name.lower()
            members = (
                _extract_zip(handle, tmp, name, on_member)
                if ".zip" in lower
                else _extract_tar(handle, tmp, name, on_member)
            )
        top = sorted({m.parts[0] for m in members})
        root = tmp
        if strip is not None and len(top) == 1 and (tmp / top[0]).is_dir():
            chosen = strip(top)
            if chosen is not None:
                root = tmp / chosen
        placed = _move_into(root, destination)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno in DESTINATION_ERRORS:
            raise  # the destination's fault, not the archive's: the caller names the folder
        raise ArchiveError(
            f"the archive {name} is corrupt or incomplete ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})",
            hint="delete it and download it again (fetch-labels checks sizes and hashes)",
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return placed


def _extract_zip(
    handle: io.IOBase, tmp: Path, name: str, on_member: Callable[[str], None] | None
) -> list[PurePosixPath]:
    members = []
    with zipfile.ZipFile(handle) as archive:
        infos = archive.infolist()
        for info in infos:  # check every name before writing anything
            _safe_member(info.filename, name)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no file type
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(
                    f"{name} holds a link or special file: {info.filename!r}", hint="the archive is refused whole"
                )
        for info in infos:
            relative = _safe_member(info.filename, name)
            if info.is_dir():
                continue
            with archive.open(info) as source:  # reading to the end checks the member's CRC
                size = _copy_member(source, tmp / Path(*relative.parts))  # type: ignore[arg-type]
            if size != info.file_size:
                raise ArchiveError(f"{name}: member {info.filename!r} came out at {size} of {info.file_size} bytes")
            members.append(relative)
            if on_member:
                on_member(info.filename)
    return members


def _extract_tar(
    handle: io.IOBase, tmp: Path, name: str, on_member: Callable[[str], None] | None
) -> list[PurePosixPath]:
    members = []
    with tarfile.open(fileobj=handle, mode="r:*") as archive:
        infos = archive.getmembers()  # reads the whole archive: a truncated one fails here
        for info in infos:
            _safe_member(info.name, name)
            if not (info.isfile() or info.isdir()):
                raise ArchiveError(
                    f"{name} holds a link or special file: {info.name!r}", hint="the archive is refused whole"
                )
        for info in infos:
            relative = _safe_member(info.name, name)
            if info.isdir():
                continue
            source = archive.extractfile(info)
            if source is None:
                raise ArchiveError(f"{name}: member {info.name!r} cannot be read")
            with source:
                size = _copy_member(source, tmp / Path(*relative.parts))  # type: ignore[arg-type]
            if size != info.size:
                raise ArchiveError(f"{name}: member {info.name!r} came out at {size} of {info.size} bytes")
            members.append(relative)
            if on_member:
                on_member(info.name)
    return members


def _move_into(root: Path, destination: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not destination.exists():
        os.rename(root, destination)
        return [destination / p.relative_to(root) for p in files]
    placed = []
    for path in files:
        target = destination / path.relative_to(root)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        placed.append(target)
    return placed
