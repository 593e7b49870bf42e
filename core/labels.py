"""The label registry: label spaces, organs, task remaps and foreign schemes, as pure data.

Nothing heavy is imported here (the command line builds its option lists from this module), and every
table is checked once, at import, by :func:`_validate_registry`.

Abdomen label space (the 7-class "generalist"): 0 background, 1 liver, 2 liver tumor, 3 pancreas,
4 pancreas tumor, 5 kidney, 6 kidney tumor. Chest space: 0 background, 1 lung, 2 lesion. The tumor of
organ value ``k`` is ``k + 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Region = Literal["abdomen", "chest"]
LabelScheme = Literal["auto", "freetumor", "totalsegmentator", "binary"]

LABEL_SCHEMES: tuple[str, ...] = ("auto", "freetumor", "totalsegmentator", "binary")

ABDOMEN_LABELS: Mapping[int, str] = {
    0: "background",
    1: "liver",
    2: "liver_tumor",
    3: "pancreas",
    4: "pancreas_tumor",
    5: "kidney",
    6: "kidney_tumor",
}

CHEST_LABELS: Mapping[int, str] = {0: "background", 1: "lung", 2: "lesion"}

REGION_LABELS: Mapping[str, Mapping[int, str]] = {"abdomen": ABDOMEN_LABELS, "chest": CHEST_LABELS}


@dataclass(frozen=True)
class Window:
    """A Hounsfield-unit window mapped to [0, 1] (values outside are clipped)."""

    low: float
    high: float


@dataclass(frozen=True)
class OrganSpec:
    """One target organ.

    Attributes:
        name: the organ's name on the command line.
        region: the label space it lives in.
        value: its label value in that space; its tumor is ``value + 1``.
        tumor_name: what its tumors are called.
        totalseg_ids: TotalSegmentator v2 "total" class ids that make up the organ.
        tumor_sign: -1 when tumors are darker than the organ (abdomen), +1 when brighter (lung).
    """

    name: str
    region: Region
    value: int
    tumor_name: str
    totalseg_ids: tuple[int, ...]
    tumor_sign: int

    @property
    def tumor_value(self) -> int:
        return self.value + 1


ORGANS: Mapping[str, OrganSpec] = {
    "liver": OrganSpec("liver", "abdomen", 1, "liver tumor", (5,), -1),
    "pancreas": OrganSpec("pancreas", "abdomen", 3, "pancreas tumor", (7,), -1),
    "kidney": OrganSpec("kidney", "abdomen", 5, "kidney tumor", (2, 3), -1),
    "lung": OrganSpec("lung", "chest", 1, "COVID-19 lesion", (10, 11, 12, 13, 14), +1),
}

ABDOMINAL_ORGANS: tuple[str, ...] = tuple(n for n, o in ORGANS.items() if o.region == "abdomen")

# The method's preprocessing windows (DESIGN §4); also used to display previews.
WINDOWS: Mapping[str, Window] = {
    "abdomen": Window(-175.0, 250.0),
    "chest": Window(-1000.0, 500.0),
}

# Task ("specialist") label spaces: 0 background, 1 organ, 2 tumor; unlisted values become 0.
TASK_REMAPS: Mapping[str, Mapping[int, int]] = {
    "liver": {1: 1, 2: 2},
    "pancreas": {3: 1, 4: 2},
    "kidney": {5: 1, 6: 2},
    "covid": {1: 1, 2: 2},
}

# TotalSegmentator v2 "total" task: the classes this tool uses or is likely to meet in a crop.
TOTALSEG_V2: Mapping[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    8: "adrenal_gland_right",
    9: "adrenal_gland_left",
    10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right",
}


def organ_spec(name: str) -> OrganSpec:
    """Return the registry entry of ``name``; raises ``KeyError`` with the known names."""
    try:
        return ORGANS[name]
    except KeyError:
        raise KeyError(f"unknown organ {name!r}; choose one of {', '.join(ORGANS)}") from None


def foreign_to_region(scheme: str, organ: OrganSpec) -> dict[int, int]:
    """Value map from a label scheme into the organ's region space, for that organ only.

    Args:
        scheme: ``"totalsegmentator"`` or ``"binary"``.
        organ: the target organ.

    Returns:
        ``{source value: region value}``; unlisted source values map to background.
    """
    if scheme == "binary":
        return {1: organ.value}
    if scheme == "totalsegmentator":
        mapping: dict[int, int] = {}
        # Every abdominal organ keeps its place, so the output label map stays useful for training.
        for other in ORGANS.values():
            if other.region == organ.region:
                mapping.update({i: other.value for i in other.totalseg_ids})
        return mapping
    raise ValueError(f"no value map for scheme {scheme!r}")


def _validate_registry() -> None:
    for region, labels in REGION_LABELS.items():
        if labels.get(0) != "background" or sorted(labels) != list(range(len(labels))):
            raise AssertionError(f"{region} labels must be 0..n-1 with 0 background")
    for name, organ in ORGANS.items():
        labels = REGION_LABELS[organ.region]
        if name != organ.name or labels.get(organ.value) != organ.name:
            raise AssertionError(f"organ {name}: value {organ.value} is not {name} in {organ.region}")
        if organ.tumor_value not in labels or organ.tumor_sign not in (-1, 1):
            raise AssertionError(f"organ {name}: tumor value or sign invalid")
        for i in organ.totalseg_ids:
            if i not in TOTALSEG_V2:
                raise AssertionError(f"organ {name}: TotalSegmentator id {i} unknown")
    for task, remap in TASK_REMAPS.items():
        if set(remap.values()) - {1, 2}:
            raise AssertionError(f"task {task} must map into 0/1/2")


_validate_registry()
