"""The registry: body regions, organs and tasks, as pure data. Every other table is derived from these.

- A :class:`Region` is a label space and how CT of that region is preprocessed (orientation, spacing,
  HU window, training crop) and how its tumors change intensity (darker in the abdomen, brighter in
  the lung).
- An :class:`Organ` is a target of tumor synthesis: its label value (its tumor is value + 1), the
  TotalSegmentator classes that make it up, the generator channel its tumors use, the size classes it
  can take.
- A :class:`Task` is what a segmentation network predicts: a region's organs (all of them, the
  "generalist", or one, a "specialist") and the map from the region's label space into the task's.

Nothing heavy is imported here (the command line builds its choices and help texts from this module),
and every table is checked once, at import, by :func:`_validate`.

Abdomen label space (the 7-class "generalist"): 0 background, 1 liver, 2 liver tumor, 3 pancreas,
4 pancreas tumor, 5 kidney, 6 kidney tumor. Chest space: 0 background, 1 lung, 2 lesion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from freetumor_cli.core.errors import ConfigError

# The rule-based engine's size classes, smallest first (their radii are engine constants:
# freetumor_cli.core.synthesis_config.SynthesisConfig).
SIZE_CLASSES: tuple[str, ...] = ("tiny", "small", "medium", "large")

# The segmentation networks (``core.models`` builds them): the method's SwinUNETR v2, a MONAI UNet for CPUs
# and a tiny one for tests.
MODELS: tuple[str, ...] = ("swinunetr", "unet", "unet-tiny")

# How organ label maps given to ``synthesize`` are encoded (``prepare`` takes all but binary).
LABEL_SCHEMES: tuple[str, ...] = ("auto", "freetumor", "totalsegmentator", "binary")
PREPARE_LABEL_SCHEMES: tuple[str, ...] = LABEL_SCHEMES[:3]


@dataclass(frozen=True)
class OneOf:
    """Configuration metadata: a string field must be one of ``choices`` (checked by ``core.config``)."""

    choices: tuple[str, ...]


def check_at_least(config: object, **minimums: float) -> None:
    """Raise ``ValueError`` naming the first field below its minimum (fields holding None are skipped)."""
    for name, low in minimums.items():
        value = getattr(config, name)
        if value is not None and not value >= low:  # also refuses NaN
            raise ValueError(f"{name} must be at least {low:g}, got {value!r}")


def check_choices(config: object) -> None:
    """Raise ``ValueError`` when a field of a config dataclass holds a value its ``OneOf`` does not allow.

    Config classes call it from ``__post_init__``, so Python callers get the checks the command line gets.
    """
    import typing

    for name, hint in typing.get_type_hints(type(config), include_extras=True).items():
        value = getattr(config, name, None)
        for part in (hint, *typing.get_args(hint)):  # an optional field: Annotated inside a Union
            for meta in getattr(part, "__metadata__", ()):
                if isinstance(meta, OneOf) and value is not None and value not in meta.choices:
                    choices = ", ".join(repr(c) for c in meta.choices)
                    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class Region:
    """A body region: its label space, its preprocessing and the direction of its tumors' contrast.

    Attributes:
        name: ``abdomen`` or ``chest``.
        labels: the label space, value -> class name (0 is background).
        window_hu: the HU window mapped to [0, 1] (clipped outside).
        spacing_mm: the voxel size networks work at, after reorienting to ``orientation``.
        roi: the training crop (and sliding-window size) in voxels.
        tumor_sign: -1 when tumors are darker than their organ (abdomen), +1 when brighter (lung).
        scale_augment: whether training augments with a random intensity scale (the chest does not).
        generalist_task: the task predicting every organ of the region (the default critic).
        generator_activation: the learned generator's output squashing: ``tanh`` or ``sigmoid``.
        adversarial_weight: λ of the generator loss.
        orientation: axis codes the preprocessing reorients to.
        synthesize_beside_real_tumors: online synthesis also in crops holding a real tumor (the chest's:
            lesions go wherever lung is); else only in crops with organ and no real tumor (the abdomen's).
        generator_map_in_organ: the generator's map is set to 0 outside the tumor's organ before it is
            blurred, so it fades at the organ's edge (the original's abdomen); else the whole map is
            blurred (the original's chest).
    """

    name: str
    labels: Mapping[int, str]
    window_hu: tuple[float, float]
    spacing_mm: tuple[float, float, float]
    roi: tuple[int, int, int]
    tumor_sign: int
    scale_augment: bool
    generalist_task: str
    generator_activation: str
    adversarial_weight: float
    orientation: str = "RAS"
    synthesize_beside_real_tumors: bool = False
    generator_map_in_organ: bool = True


@dataclass(frozen=True)
class Organ:
    """A target organ of tumor synthesis.

    Attributes:
        name: the organ's name (``synthesize --organ``).
        region: the region whose label space it lives in.
        value: its label value there; its tumor is ``value + 1``.
        tumor_name: what its tumors are called, in messages.
        totalseg_ids: TotalSegmentator v2 "total" class ids that make up the organ.
        generator_channel: the learned generator's output channel for its tumors.
        size_classes: the size classes its tumors may take (``mix`` draws among those that fit).
        size_weights: how often ``mix`` draws each of ``size_classes`` (None: equally often).
    """

    name: str
    region: str
    value: int
    tumor_name: str
    totalseg_ids: tuple[int, ...]
    generator_channel: int
    size_classes: tuple[str, ...] = SIZE_CLASSES
    size_weights: tuple[float, ...] | None = None

    @property
    def tumor_value(self) -> int:
        return self.value + 1

    @property
    def tumor_sign(self) -> int:
        return REGIONS[self.region].tumor_sign


@dataclass(frozen=True)
class Task:
    """What a segmentation network predicts.

    Attributes:
        name: the task's name (``train-seg --organ``).
        region: the region whose label space the data is in.
        organs: the organs (with their tumors) it segments; synthetic tumors go into these.
        remap: region value -> task value for the values kept, others become background; ``None``
            when the task predicts the region's own label space.
        description: one line for help texts.
    """

    name: str
    region: str
    organs: tuple[str, ...]
    remap: Mapping[int, int] | None
    description: str

    @property
    def labels(self) -> dict[int, str]:
        """The task's label space, value -> class name."""
        space = REGIONS[self.region].labels
        if self.remap is None:
            return dict(space)
        return {0: space[0], **{t: space[v] for v, t in sorted(self.remap.items(), key=lambda kv: kv[1])}}

    @property
    def out_channels(self) -> int:
        return len(self.labels)

    @property
    def tumor_labels(self) -> dict[int, str]:
        """The classes of a network that segments only the task's tumors: background, then each organ's
        tumor in ``organs`` order (the authors' COVID-19 baseline: background, lesion)."""
        space = REGIONS[self.region].labels
        return {0: space[0], **{i + 1: space[ORGANS[o].tumor_value] for i, o in enumerate(self.organs)}}

    def region_to_task(self) -> dict[int, int]:
        """Region value -> task value for every kept region value (background excluded)."""
        if self.remap is None:
            return {v: v for v in REGIONS[self.region].labels if v}
        return dict(self.remap)

    def task_to_region(self) -> dict[int, int]:
        """Task value -> region value (background excluded); the inverse of :meth:`region_to_task`."""
        return {t: v for v, t in self.region_to_task().items()}

    @property
    def region_class_names(self) -> tuple[str, ...]:
        """The region-space names of the classes the task predicts, background excluded."""
        space = REGIONS[self.region].labels
        return tuple(space[v] for v in sorted(self.region_to_task()))

    @property
    def organ_values(self) -> dict[int, str]:
        """Task value of each organ -> the organ's name."""
        remap = self.region_to_task()
        return {remap[ORGANS[o].value]: o for o in self.organs}

    @property
    def tumor_values(self) -> tuple[int, ...]:
        """The task values meaning tumor, one per organ, in ``organs`` order."""
        remap = self.region_to_task()
        return tuple(remap[ORGANS[o].tumor_value] for o in self.organs)

    def tumor_channel(self, organ: str) -> int:
        """The output channel meaning "tumor of ``organ``" (what quality control reads).

        Raises:
            ConfigError: the task does not segment that organ.
        """
        if organ not in self.organs:
            raise ConfigError(
                f"a {self.name} network does not segment {organ} tumors",
                hint=f"use a network of a task that includes {organ}: {', '.join(tasks_with_organ(organ))}",
            )
        return self.region_to_task()[ORGANS[organ].tumor_value]


# How a synthetic tumor gets its intensity change (core/engines.py): the rule's scalar or a generator's map.
ENGINES: tuple[str, ...] = ("rules", "generator")
EngineName = Annotated[str, OneOf(ENGINES)]


def engine_of(synth: str | None) -> EngineName:
    """The engine a setting names: ``rules`` (or nothing) is the rule engine; a path is a generator.

    ``train-seg --synth`` takes ``rules`` or a generator's path, ``synthesize`` an engine and a path:
    both mean one of :data:`ENGINES`.
    """
    return "rules" if synth in (None, "", "rules") else "generator"


_ABDOMEN_LABELS = {
    0: "background",
    1: "liver",
    2: "liver_tumor",
    3: "pancreas",
    4: "pancreas_tumor",
    5: "kidney",
    6: "kidney_tumor",
}

REGIONS: Mapping[str, Region] = {
    r.name: r
    for r in (
        Region(
            "abdomen", _ABDOMEN_LABELS, (-175.0, 250.0), (1.5, 1.5, 1.5), (96, 96, 96),
            tumor_sign=-1, scale_augment=True, generalist_task="all", generator_activation="tanh",
            adversarial_weight=0.1,
        ),
        Region(
            "chest", {0: "background", 1: "lung", 2: "lesion"}, (-1000.0, 500.0), (1.25, 1.25, 5.0), (192, 192, 32),
            tumor_sign=+1, scale_augment=False, generalist_task="covid", generator_activation="sigmoid",
            adversarial_weight=0.5, synthesize_beside_real_tumors=True, generator_map_in_organ=False,
        ),
    )
}  # fmt: skip

ORGANS: Mapping[str, Organ] = {
    o.name: o
    for o in (
        Organ("liver", "abdomen", 1, "liver tumor", (5,), generator_channel=0),
        Organ("pancreas", "abdomen", 3, "pancreas tumor", (7,), generator_channel=1),
        Organ("kidney", "abdomen", 5, "kidney tumor", (2, 3), generator_channel=2),
        Organ(
            "lung",
            "chest",
            1,
            "COVID-19 lesion",
            (10, 11, 12, 13, 14),
            generator_channel=0,
            size_classes=("tiny", "small", "medium"),
            size_weights=(0.35, 0.35, 0.30),
        ),
    )
}

TASKS: Mapping[str, Task] = {
    t.name: t
    for t in (
        Task("liver", "abdomen", ("liver",), {1: 1, 2: 2}, "liver and liver tumors"),
        Task("pancreas", "abdomen", ("pancreas",), {3: 1, 4: 2}, "pancreas and pancreas tumors"),
        Task("kidney", "abdomen", ("kidney",), {5: 1, 6: 2}, "kidneys and kidney tumors"),
        Task("covid", "chest", ("lung",), None, "lung and COVID-19 lesions"),
        Task("all", "abdomen", ("liver", "pancreas", "kidney"), None, "the 7-class abdomen generalist"),
    )
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

# The label spaces of the files ``evaluate`` scores (``--label-space``): a region's, or a specialist task's.
EVAL_SPACES: Mapping[str, Mapping[int, str]] = {
    **{name: r.labels for name, r in REGIONS.items()},
    "task": {0: "background", 1: "organ", 2: "tumor"},
}

# Configuration field types: a string that must name a registry entry.
RegionName = Annotated[str, OneOf(tuple(REGIONS))]
OrganName = Annotated[str, OneOf(tuple(ORGANS))]
TaskName = Annotated[str, OneOf(tuple(TASKS))]
SizeName = Annotated[str, OneOf((*SIZE_CLASSES, "mix"))]
LabelSchemeName = Annotated[str, OneOf(LABEL_SCHEMES)]
EvalSpaceName = Annotated[str, OneOf(tuple(EVAL_SPACES))]


def _lookup(table: Mapping[str, object], kind: str, name: str) -> object:
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}", hint=f"choose one of {', '.join(table)}") from None


def task(name: str) -> Task:
    """The registry entry of task ``name``; raises :class:`ConfigError` naming the known ones."""
    return _lookup(TASKS, "task", name)  # type: ignore[return-value]


def region_organs(name: str) -> tuple[Organ, ...]:
    """The organs of a region, in registry order."""
    return tuple(o for o in ORGANS.values() if o.region == name)


def region_tasks(name: str) -> tuple[str, ...]:
    """The names of the tasks of a region."""
    return tuple(t.name for t in TASKS.values() if t.region == name)


def tasks_with_organ(name: str) -> tuple[str, ...]:
    """The names of the tasks that segment organ ``name``."""
    return tuple(t.name for t in TASKS.values() if name in t.organs)


def generator_channels(region_name: str) -> int:
    """Output channels of the learned generator of a region: one per distinct organ channel."""
    return 1 + max(o.generator_channel for o in region_organs(region_name))


def foreign_to_region(scheme: str, target: Organ) -> dict[int, int]:
    """Value map from a foreign label scheme into the target organ's region space.

    Args:
        scheme: ``"totalsegmentator"`` (every organ of the region keeps its place, so the output label
            map stays useful for training) or ``"binary"`` (1 is the target organ).
        target: the target organ.

    Returns:
        ``{source value: region value}``; unlisted source values map to background.
    """
    if scheme == "binary":
        return {1: target.value}
    if scheme == "totalsegmentator":
        return totalsegmentator_to_region(target.region)
    raise ValueError(f"no value map for scheme {scheme!r}")


def totalsegmentator_to_region(region_name: str) -> dict[int, int]:
    """TotalSegmentator v2 "total" class id -> the region value of each of the region's organs (both
    kidneys are one kidney, the five lung lobes one lung); other classes are background."""
    return {i: organ.value for organ in region_organs(region_name) for i in organ.totalseg_ids}


def choices_help(table: Mapping[str, Task] | Mapping[str, Organ]) -> str:
    """``name (what)`` for each entry, for help texts."""
    parts = []
    for name, entry in table.items():
        what = entry.description if isinstance(entry, Task) else entry.tumor_name + "s"
        parts.append(f"{name} ({what})")
    return ", ".join(parts)


def _validate() -> None:
    for r in REGIONS.values():
        if r.labels.get(0) != "background" or sorted(r.labels) != list(range(len(r.labels))):
            raise AssertionError(f"region {r.name}: labels must be 0..n-1 with 0 background")
        if r.tumor_sign not in (-1, 1) or r.generator_activation not in ("tanh", "sigmoid"):
            raise AssertionError(f"region {r.name}: tumor sign or generator activation invalid")
        if r.window_hu[0] >= r.window_hu[1] or min(r.spacing_mm) <= 0 or min(r.roi) < 1:
            raise AssertionError(f"region {r.name}: window, spacing or crop invalid")
        if r.generalist_task not in TASKS or TASKS[r.generalist_task].region != r.name:
            raise AssertionError(f"region {r.name}: generalist task {r.generalist_task!r} is not one of its tasks")
    for name, o in ORGANS.items():
        labels = REGIONS[o.region].labels
        if name != o.name or labels.get(o.value) != o.name:
            raise AssertionError(f"organ {name}: value {o.value} is not {name} in the {o.region} labels")
        if o.tumor_value not in labels or o.tumor_value in {p.value for p in ORGANS.values() if p.region == o.region}:
            raise AssertionError(f"organ {name}: tumor value {o.tumor_value} is not a tumor class of {o.region}")
        if not set(o.size_classes) <= set(SIZE_CLASSES) or not o.size_classes:
            raise AssertionError(f"organ {name}: size classes must be among {SIZE_CLASSES}")
        if o.size_weights is not None and (len(o.size_weights) != len(o.size_classes) or min(o.size_weights) < 0):
            raise AssertionError(f"organ {name}: one non-negative weight per size class")
        if any(i not in TOTALSEG_V2 for i in o.totalseg_ids) or o.generator_channel < 0:
            raise AssertionError(f"organ {name}: TotalSegmentator id or generator channel invalid")
    for name, t in TASKS.items():
        if name != t.name or not t.organs or any(ORGANS[o].region != t.region for o in t.organs):
            raise AssertionError(f"task {name}: its organs must be organs of the {t.region}")
        space = REGIONS[t.region].labels
        kept = t.region_to_task()
        if set(kept) - set(space) or sorted(set(kept.values())) != list(range(1, t.out_channels)):
            raise AssertionError(f"task {name}: the remap must map {t.region} values onto 1..n-1")
        if len(set(kept.values())) != len(kept):
            raise AssertionError(f"task {name}: two region values map onto one task value")
        for organ_name in t.organs:
            value, tumor = ORGANS[organ_name].value, ORGANS[organ_name].tumor_value
            if value not in kept or tumor not in kept or kept[tumor] != kept[value] + 1:
                raise AssertionError(f"task {name}: organ {organ_name} must map to k and its tumor to k + 1")


_validate()
