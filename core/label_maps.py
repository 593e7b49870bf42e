"""Label maps: the checks that tell why a map cannot be used, its values, lookup tables and grids, and the
scheme it is encoded in.

Checks return a reason (``None`` when the map passes), so ``prepare`` can skip a case with it and the other
commands raise it in their own words. Lookup tables map values (one source scheme into a region's space, a
region's into a task's, network channels into a region's) as ``uint8`` tables.

How an organ label map is encoded is one decision for ``synthesize`` and ``prepare``.

Schemes (:data:`~freetumor_cli.core.registry.LABEL_SCHEMES`): ``freetumor`` (a region's label space),
``totalsegmentator`` (TotalSegmentator v2 "total" class ids) and, for ``synthesize``, ``binary`` (1 is
the target organ). ``auto`` reads the map's values, and decides only where they leave one reading:

- a map freetumor wrote (its header says so) is in freetumor's scheme;
- values beyond freetumor's space of the region can only be TotalSegmentator's;
- a map of 0 and 1 only is a binary mask of the target organ (``synthesize``);
- otherwise both schemes give the values a meaning: when only one of them shows an organ of the region,
  that one is used; when both do (values 1-5 are liver, pancreas and kidney for freetumor, and spleen,
  kidneys and liver in TotalSegmentator's ``--roi_subset`` output), the map is ambiguous and refused
  with the flag that settles it, never guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from freetumor_cli.core.errors import GeometryError
from freetumor_cli.core.registry import REGIONS, TOTALSEG_V2, region_organs

if TYPE_CHECKING:
    from freetumor_cli.core.io import Volume

LABELS_DESCRIP = b"freetumor labels"  # the header of every label map freetumor writes says so

# Relative tolerance on affines when comparing an image with its labels: header round-offs in
# real data (float32 qform vs sform) are far below it; a different grid is far above.
AFFINE_TOLERANCE_MM = 1e-3


def integer_problem(array: np.ndarray) -> str | None:
    """Why ``array`` cannot be a label map because of its values' type ("holds non-integer values", NaN
    included), or None: integer arrays, and float arrays of whole numbers, can."""
    if np.issubdtype(array.dtype, np.integer):
        return None
    if np.isnan(array).any() or not np.array_equal(array, np.rint(array)):
        return "holds non-integer values"
    return None


def integer_labels(array: np.ndarray) -> np.ndarray:
    """A label array as integers: an integer one as it is, a float one of whole numbers (checked with
    :func:`integer_problem`) as int64."""
    return array if np.issubdtype(array.dtype, np.integer) else array.astype(np.int64)


def label_values(array: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer label array, shape ``(n,)`` (one pass over a table of the
    value range when it is small, as label ranges are)."""
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = int(array.min()), int(array.max())
    if high - low >= 1 << 16:
        return np.unique(array).astype(np.int64)
    seen = np.zeros(high - low + 1, dtype=bool)
    flat = array.ravel(order="K")
    seen[flat - low if low else flat] = True
    return np.flatnonzero(seen) + low


def lookup_table(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A ``uint8`` table of ``size`` entries: ``table[source] = target`` for each source below ``size``, every
    other value 0."""
    table = np.zeros(size, dtype=np.uint8)
    for source, target in mapping.items():
        if 0 <= source < size:
            table[source] = target
    return table


def relabel(array: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """``array``'s values (non-negative integers) through ``mapping``, values it does not name becoming 0:
    a ``uint8`` array in ``array``'s memory order (NIfTI arrays are Fortran-ordered: writing it is then a
    plain copy)."""
    high = int(array.max()) if array.size else 0
    out = np.empty_like(array, dtype=np.uint8)
    np.take(lookup_table(mapping, high + 1), array, out=out)
    return out


class Gridded(Protocol):
    """Anything with a voxel grid: a :class:`~freetumor_cli.core.io.Volume` or a nibabel image."""

    @property
    def shape(self) -> Any: ...

    @property
    def affine(self) -> Any: ...


def grid_problem(reference: Gridded, other: Gridded, *, tolerance_mm: float = AFFINE_TOLERANCE_MM) -> str | None:
    """Why ``other`` does not lie on ``reference``'s voxel grid ("have different shapes ...", "have different
    affines ..."), or None.

    The affines may differ by ``tolerance_mm`` (relative to the voxel size for the rotation-zoom part,
    absolute in mm for the origin), which absorbs float32 header round-off.
    """
    shapes = tuple(int(n) for n in reference.shape[:3]), tuple(int(n) for n in other.shape[:3])
    if shapes[0] != shapes[1]:
        return f"have different shapes ({shapes[0]} and {shapes[1]})"
    matrix = np.asarray(reference.affine, dtype=np.float64)
    scale = max(float(np.abs(matrix[:3, :3]).max()), 1.0)
    diff = np.abs(matrix - np.asarray(other.affine, dtype=np.float64))
    if diff[:3, :3].max() > tolerance_mm * scale or diff[:3, 3].max() > max(tolerance_mm * scale, 1e-2):
        return f"have different affines (largest difference {diff.max():.4g} mm)"
    return None


def check_same_grid(image: Volume, labels: Volume, *, tolerance_mm: float = AFFINE_TOLERANCE_MM) -> None:
    """Raise :class:`GeometryError` unless ``labels`` lies on ``image``'s voxel grid (:func:`grid_problem`)."""
    problem = grid_problem(image, labels, tolerance_mm=tolerance_mm)
    if problem:
        raise GeometryError(
            f"image {image.name} and labels {labels.name} {problem}",
            hint="the organ mask must be on the CT's voxel grid; resample it with nearest neighbour",
        )


@dataclass(frozen=True)
class SchemeChoice:
    """The scheme a label map is read in, or why none can be chosen.

    Attributes:
        scheme: ``freetumor``, ``totalsegmentator`` or ``binary``; None when the map is ambiguous.
        reason: how the scheme was chosen, or (scheme None) what is ambiguous and which flag settles it.
    """

    scheme: str | None
    reason: str


def written_by_freetumor(header: Any) -> bool:
    """Whether a NIfTI header is one freetumor wrote for a label map in its own scheme."""
    if header is None:
        return False
    try:
        return bytes(header["descrip"]).rstrip(b"\0") == LABELS_DESCRIP
    except (KeyError, TypeError, ValueError):
        return False


def _organ_ids(region: str, scheme: str) -> set[int]:
    """The values that mean an organ of ``region`` (or, in freetumor's scheme, its tumor)."""
    ids: set[int] = set()
    for organ in region_organs(region):
        ids |= {organ.value, organ.tumor_value} if scheme == "freetumor" else set(organ.totalseg_ids)
    return ids


def choose_scheme(
    values: Iterable[int],
    region: str,
    *,
    binary: bool = False,
    freetumor_file: bool = False,
    flag: str = "--label-scheme ",
) -> SchemeChoice:
    """Choose how to read a label map from the values it holds (the ``auto`` scheme, module doc).

    Args:
        values: the distinct values of the map.
        region: the region whose organs the map must show (the target organ's, for ``synthesize``).
        binary: a map of 0 and 1 only is a binary mask of the target organ (``synthesize``).
        freetumor_file: the map's header says freetumor wrote it (:func:`written_by_freetumor`).
        flag: how the caller's user sets the scheme (``--label-scheme `` or ``label_scheme=``), for the
            message of an ambiguous map.
    """
    present = {int(v) for v in values} - {0}
    space = set(REGIONS[region].labels)
    if freetumor_file:
        return SchemeChoice("freetumor", "written by freetumor")
    if not present <= space:
        beyond = sorted(present - space)
        return SchemeChoice("totalsegmentator", f"values {_listed(beyond)} lie beyond freetumor's {region} labels")
    if binary and present <= {1}:
        return SchemeChoice("binary", "only 0 and 1")
    # Both schemes give these values a meaning: a reading counts when it shows an organ of the region.
    found = {scheme: present & _organ_ids(region, scheme) for scheme in ("freetumor", "totalsegmentator")}
    found = {scheme: ids for scheme, ids in found.items() if ids}
    if len(found) < 2:
        return SchemeChoice(next(iter(found), "freetumor"), f"the only reading that shows a {region} organ")
    readings = "; ".join(
        f"{scheme}: " + ", ".join(f"{v} {_meaning(scheme, region, v)}" for v in sorted(ids)[:6])
        for scheme, ids in found.items()
    )
    return SchemeChoice(
        None,
        f"values {_listed(sorted(present))} mean different organs in freetumor's scheme and in "
        f"TotalSegmentator's ({readings}): pass {_setting(flag, 'freetumor')} or "
        f"{_setting(flag, 'totalsegmentator')}",
    )


def _setting(flag: str, scheme: str) -> str:
    return f'{flag}"{scheme}"' if flag.endswith("=") else f"{flag}{scheme}"


def _meaning(scheme: str, region: str, value: int) -> str:
    if scheme == "freetumor":
        return REGIONS[region].labels[value]
    return TOTALSEG_V2.get(value, f"class {value}")


def _listed(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:12]) + (", ..." if len(values) > 12 else "")
