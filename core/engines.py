"""Intensity models: what a synthetic tumor does to the image's values, given its geometry.

The rule engine (:mod:`freetumor_cli.core.tumor`) makes each tumor's geometry once: its voxels and its
*profile*, ``blur(mask) · texture`` inside the organ (0 outside, about 1 in the tumor's core). An
intensity model turns a profile into a signed change of the image's values:

- :class:`RuleIntensity`: one scalar per tumor, ``sign · d · profile`` with ``d`` drawn from the
  region's range (SyntheticTumors' recipe); ``scale`` converts HU into the image's units (``1/width``
  on windowed crops), so no constant of the engine is ever divided.
- the generator (:class:`freetumor_cli.core.learned.GeneratorIntensity`): ``sign · profile · map``,
  with the generator's per-voxel map in place of ``d``.

A new engine (a diffusion model, say) implements :class:`IntensityModel`: geometry, texture and edge
stay the rule engine's. Overlapping tumors compose as one lesion would: at each voxel the change of
largest magnitude wins (:func:`compose_changes`), never their sum. Pure numpy, no torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from freetumor_cli.core.registry import ENGINES, REGIONS, Organ, engine_of

if TYPE_CHECKING:
    from freetumor_cli.core.synthesis_config import SynthesisConfig
    from freetumor_cli.core.tumor import TumorRecord

__all__ = [
    "ENGINES",
    "IntensityModel",
    "RuleIntensity",
    "Scene",
    "TumorGeometry",
    "compose_changes",
    "engine_of",
    "wrong_contrast",
]

Box = tuple[slice, slice, slice]


def wrong_contrast(region: str, hu_change: float, what: str) -> str | None:
    """A warning when tumors' measured mean intensity change (HU) has the wrong sign for their region
    (abdominal tumors are darker than their organ, lung lesions brighter), else None.

    Args:
        region: the tumors' region.
        hu_change: their mean change in HU (changes under 1 HU count as no contrast, not a wrong one).
        what: what made them, for the message ("the generator's tumors", ...).
    """
    sign = REGIONS[region].tumor_sign
    if abs(hu_change) < 1.0 or hu_change * sign > 0:
        return None
    came, should = ("brighter", "darker") if hu_change > 0 else ("darker", "brighter")
    return (
        f"{what} come out {abs(hu_change):.0f} HU {came} than their organ, where {region} tumors are {should}: "
        "train the generator longer or choose another checkpoint, or use the rule-based engine"
    )


@dataclass
class TumorGeometry:
    """One tumor's geometry, made once whatever the engine.

    Attributes:
        box: where the tumor may change the image, within the organ's bounding box.
        mask: the tumor's voxels (bool), shape of ``box``.
        profile: ``blur(mask) · texture`` inside the organ (float32, >= 0), shape of ``box``.
        record: what was drawn; the intensity fields are filled in by :func:`apply_intensity`.
    """

    box: Box
    mask: np.ndarray
    profile: np.ndarray
    record: TumorRecord


@dataclass(frozen=True)
class Scene:
    """What an intensity model may look at: the image, its grid and the organ.

    Attributes:
        image: the whole volume (HU, or windowed units for training crops), not modified.
        affine: its voxel-to-world matrix.
        bbox: the organ's bounding box in ``image``; tumor boxes are relative to it.
        organ: the tumor's organ (its region's sign and ranges).
        organ_mask: the organ's voxels over ``bbox`` (bool), before the tumors; None when unknown.
    """

    image: np.ndarray
    affine: np.ndarray
    bbox: Box
    organ: Organ
    organ_mask: np.ndarray | None = None

    def global_box(self, box: Sequence[slice]) -> Box:
        """A box within the organ's bounding box, as a box of the whole volume."""
        return tuple(  # type: ignore[return-value]
            slice(o.start + b.start, o.start + b.stop) for o, b in zip(self.bbox, box, strict=True)
        )


class IntensityModel(Protocol):
    """Gives each tumor's intensity change; everything else is the rule engine's."""

    name: str

    def change(self, tumor: TumorGeometry, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """The tumor's signed change over ``tumor.box`` (float32, image units), and its nominal change in HU."""
        ...


@dataclass(frozen=True)
class RuleIntensity:
    """``sign · d · profile``: one intensity change ``d`` (HU), uniform in ``hu_change``, per tumor.

    Attributes:
        hu_change: the range of ``d`` in HU (the region's, from :class:`SynthesisConfig`).
        scale: image units per HU: 1 on CTs in HU, ``1 / window width`` on [0, 1]-windowed crops.
    """

    hu_change: tuple[float, float]
    scale: float = 1.0
    name: str = "rules"

    @classmethod
    def for_region(
        cls, region: str, config: SynthesisConfig, *, window_hu: tuple[float, float] | None = None
    ) -> RuleIntensity:
        """The region's rule, on HU images or (with ``window_hu``) on crops windowed to [0, 1]."""
        scale = 1.0 if window_hu is None else 1.0 / float(window_hu[1] - window_hu[0])
        low, high = config.hu_change(region)
        return cls((float(low), float(high)), scale)

    @property
    def mean_hu(self) -> float:
        return (self.hu_change[0] + self.hu_change[1]) / 2

    def of_profile(self, profile: np.ndarray, sign: float, hu: float) -> np.ndarray:
        """The change a profile gets for an intensity change of ``hu`` (works on arrays and tensors)."""
        return profile * (sign * hu * self.scale)

    def change(self, tumor: TumorGeometry, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        hu = float(rng.uniform(*self.hu_change))
        sign = float(REGIONS[scene.organ.region].tumor_sign)
        return self.of_profile(tumor.profile, sign, hu).astype(np.float32, copy=False), sign * hu


def compose_changes(patches: Sequence[tuple[Sequence[slice], np.ndarray]], shape: Sequence[int]) -> np.ndarray:
    """The tumors' changes on one array of ``shape``: where they overlap, the largest magnitude wins.

    A voxel covered by two tumors is no darker (or brighter) than the most contrasted of them, as in
    one lesion; adding them would darken it twice.
    """
    out = np.zeros(tuple(int(n) for n in shape), dtype=np.float32)
    for box, delta in patches:
        region = out[tuple(box)]
        stronger = np.abs(delta) > np.abs(region)
        region[stronger] = delta[stronger]
    return out


def apply_intensity(
    tumors: Sequence[TumorGeometry], model: IntensityModel, scene: Scene, rng: np.random.Generator
) -> list[tuple[Box, np.ndarray]]:
    """Each tumor's change from ``model``, with its record's intensity fields filled in."""
    patches = []
    for tumor in tumors:
        delta, nominal = model.change(tumor, scene, rng)
        voxels = int(np.count_nonzero(tumor.mask))
        tumor.record.intensity_change_hu = round(float(nominal), 2)
        tumor.record.mean_hu_change = (
            round(float(np.sum(delta, where=tumor.mask, dtype=np.float64)) / voxels, 2) if voxels else 0.0
        )
        patches.append((tumor.box, delta))
    return patches
