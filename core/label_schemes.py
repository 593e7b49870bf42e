"""How an organ label map is encoded: one decision for ``synthesize`` and ``prepare``.

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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from freetumor_cli.core.io import LABELS_DESCRIP
from freetumor_cli.core.registry import REGIONS, TOTALSEG_V2, region_organs


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
