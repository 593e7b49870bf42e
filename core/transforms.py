"""MONAI dictionary transforms that insert synthetic tumors into training crops.

Built as MONAI's are: the work is in a plain array function (:func:`synthesize_in_crop`; for any label
map :func:`synthesize_in_labelled_crop`, which nnU-Net's transform uses too), and the dictionary
wrappers are :class:`~monai.transforms.Randomizable` :class:`~monai.transforms.MapTransform` classes
with ``keys``, each owning its random state (a ``numpy.random.Generator``, set by ``set_random_state``). ``train-seg`` uses these same transforms. Example::

    from monai.transforms import Compose, LoadImaged, EnsureChannelFirstd, ScaleIntensityRanged
    from freetumor_cli.core.transforms import RandTumorSynthd

    chain = Compose([
        LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
        ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0, b_max=1, clip=True),
        RandTumorSynthd(keys=["image", "label"], task="liver", window_hu=(-175, 250)),
    ])

Labels are in the task's label space (``liver``: 1 liver, 2 tumor; ``all``: the abdomen's 7 classes).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_dst_type, convert_to_numpy

from freetumor_cli.core.engines import IntensityModel, RuleIntensity, Scene, apply_intensity, compose_changes
from freetumor_cli.core.errors import FreetumorError
from freetumor_cli.core.registry import ORGANS, REGIONS, TASKS
from freetumor_cli.core.synthesis_config import SynthesisConfig
from freetumor_cli.core.tumor import place_tumors

MIN_ORGAN_VOXELS = 8  # an organ part smaller than this in a crop is not offered a tumor


@dataclass
class CropSynthesis:
    """What :func:`synthesize_in_crop` made of one crop (all arrays of the crop's shape).

    Attributes:
        image: the crop with the tumor (the input itself when there is no intensity model).
        label: the crop's labels, the tumor's voxels set to its tumor value.
        mask: the synthetic tumor's voxels (bool).
        profile: ``blur(mask) · texture`` inside the organ (float32), for a learned intensity.
        organ_index: the tumor's organ, as an index into the task's organs.
    """

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    profile: np.ndarray
    organ_index: int


@dataclass(frozen=True)
class LabelledOrgan:
    """An organ as a crop's labels hold it.

    Attributes:
        name: the organ's registry name (its region, tumor sign and size classes).
        value: its label value in the crop.
        tumor_value: the label value of its tumors in the crop.
    """

    name: str
    value: int
    tumor_value: int


@dataclass(frozen=True)
class CropLabels:
    """Which label values of a crop are organs that may get a tumor, and the values of their tumors.

    A task's labels (:meth:`of_task`), or any other label map (an nnU-Net dataset's). All organs lie in one
    region, whose rule says whether a crop that holds a real tumor gets a synthetic one too.
    """

    organs: tuple[LabelledOrgan, ...]

    def __post_init__(self) -> None:
        if not self.organs:
            raise ValueError("at least one organ is needed")
        unknown = [o.name for o in self.organs if o.name not in ORGANS]
        if unknown:
            raise ValueError(f"unknown organ {unknown[0]!r}; choose among {', '.join(ORGANS)}")
        if len({ORGANS[o.name].region for o in self.organs}) > 1:
            raise ValueError("the organs of one crop must lie in one region")
        values = [v for o in self.organs for v in (o.value, o.tumor_value)]
        if len(set(values)) != len(values) or min(values) < 1:
            raise ValueError(f"organ and tumor label values must be distinct and positive, got {values}")

    @classmethod
    def of_task(cls, task: str) -> CropLabels:
        """The labels of a task's space: its organs' values, each tumor one above its organ."""
        spec = TASKS[task]
        return cls(tuple(LabelledOrgan(name, value, value + 1) for value, name in spec.organ_values.items()))

    @property
    def region(self) -> str:
        return ORGANS[self.organs[0].name].region


def synthesize_in_crop(
    image: np.ndarray,
    label: np.ndarray,
    task: str,
    *,
    rng: np.random.Generator,
    spacing_mm: Sequence[float],
    intensity: IntensityModel | None,
    window_hu: tuple[float, float] | None = None,
    size: str = "mix",
    config: SynthesisConfig | None = None,
    intensity_rng: np.random.Generator | None = None,
) -> CropSynthesis | None:
    """Insert one tumor into an organ of a crop that holds an organ and no real tumor.

    Args:
        image: the crop, shape ``(X, Y, Z)``, in HU or (with ``window_hu``) windowed to [0, 1].
        label: its labels in the task's space, same shape.
        task: the task (which organs may get a tumor, and their values).
        rng: the only source of randomness.
        spacing_mm: voxel size of the crop.
        intensity: the intensity model, or None for the geometry only (the image is not changed).
        window_hu: the window the crop was scaled with: the change is scaled to it and the result
            clipped to [0, 1].
        size: a size class or ``"mix"``.
        config: the rule engine's constants.
        intensity_rng: the intensity's own source (None: ``rng`` after the geometry).

    Returns:
        The crop with its tumor, or None when no tumor was drawn (no organ, a real tumor present where
        the region does not synthesize beside real tumors, or an organ part too small).
    """
    return synthesize_in_labelled_crop(
        image, label, CropLabels.of_task(task), rng=rng, spacing_mm=spacing_mm, intensity=intensity,
        value_range=(0.0, 1.0) if window_hu is not None else None, size=size, config=config,
        intensity_rng=intensity_rng,
    )  # fmt: skip


def synthesize_in_labelled_crop(
    image: np.ndarray,
    label: np.ndarray,
    labels: CropLabels,
    *,
    rng: np.random.Generator,
    spacing_mm: Sequence[float],
    intensity: IntensityModel | None,
    value_range: tuple[float, float] | None = None,
    body_axis: int = 2,
    size: str = "mix",
    config: SynthesisConfig | None = None,
    in_place: bool = False,
    intensity_rng: np.random.Generator | None = None,
) -> CropSynthesis | None:
    """:func:`synthesize_in_crop` for any label map: insert one tumor into an organ of a crop.

    Args:
        image: the crop, shape ``(X, Y, Z)``, in the units ``intensity`` changes it in.
        label: its labels, same shape; values that are none of ``labels``' (a padding value, other
            classes) are neither organ nor tumor and are left as they are.
        labels: which values are organs, and their tumors' values.
        rng: the only source of randomness.
        spacing_mm: voxel size of the crop.
        intensity: the intensity model, or None for the geometry only (the image is not changed).
        value_range: the range the image's values were clipped to: the result is clipped to it too.
        body_axis: the crop's axis along the body (the engine prefers centers in the organ's middle along it).
        size: a size class or ``"mix"``.
        config: the rule engine's constants.
        in_place: change ``image`` (float32) and ``label`` (integers) themselves rather than copies, as a
            training pipeline's transforms may: no copy of a large crop.
        intensity_rng: the intensity's own source (None: ``rng`` after the geometry).

    Returns:
        The crop with its tumor, or None when no tumor was drawn (see :func:`synthesize_in_crop`).
    """
    lab = np.asarray(label)
    if not np.issubdtype(lab.dtype, np.integer):  # MONAI's float labels
        lab = lab.astype(np.int64)
    organs = [(o, lab == o.value) for o in labels.organs]
    present = [(o, voxels) for o, voxels in organs if np.count_nonzero(voxels) >= MIN_ORGAN_VOXELS]
    beside = REGIONS[labels.region].synthesize_beside_real_tumors  # the chest: wherever lung is
    if not present or (not beside and any((lab == o.tumor_value).any() for o in labels.organs)):
        return None
    target, organ_mask = present[int(rng.integers(len(present)))]
    organ = ORGANS[target.name]
    affine = _crop_affine(spacing_mm, body_axis)
    try:
        # A crop shows a part of its organ, and rules.max_tumor_share is a share of a whole organ: one
        # tumor may fill the part of it in the crop, as in the method (the cap applies to synthesize).
        whole_organ = replace(config or SynthesisConfig(), max_tumor_share=1.0)
        placement = place_tumors(
            organ_mask, organ, spacing=spacing_mm, affine=affine, rng=rng, size=size, count=1, config=whole_organ
        )
    except FreetumorError:
        return None
    img = np.asarray(image, dtype=np.float32)
    mask = np.zeros(lab.shape, dtype=bool)
    mask[placement.bbox] = placement.tumor_mask
    profile = np.zeros(lab.shape, dtype=np.float32)
    profile[placement.bbox] = placement.profile()
    out_image = img
    if intensity is not None:
        patches = apply_intensity(
            placement.tumors,
            intensity,
            Scene(img, affine, placement.bbox, organ, placement.organ_mask),
            rng if intensity_rng is None else intensity_rng,
        )
        out_image = img if in_place else img.copy()
        changed = out_image[placement.bbox] + compose_changes(patches, placement.tumor_mask.shape)
        out_image[placement.bbox] = np.clip(changed, *value_range) if value_range is not None else changed
    out_label = lab if in_place else lab.copy()
    out_label[placement.bbox][placement.tumor_mask] = target.tumor_value
    return CropSynthesis(out_image, out_label, mask, profile, labels.organs.index(target))


def _crop_affine(spacing_mm: Sequence[float], body_axis: int) -> np.ndarray:
    """A voxel-to-world matrix of a crop with ``spacing_mm``, whose ``body_axis`` runs along the world's z."""
    affine = np.eye(4)
    order = [a for a in range(3) if a != body_axis] + [body_axis]
    for row, axis in enumerate(order):
        affine[row, axis] = float(spacing_mm[axis])
    return affine


class RandTumorSynthd(Randomizable, MapTransform):
    """Insert one rule-based synthetic tumor into an organ of each crop (FreeTumor's online synthesis).

    Args:
        keys: the image key and the label key, in that order.
        task: the task whose organs get tumors (``liver``, ``pancreas``, ``kidney``, ``all``, ``covid``).
        spacing_mm: the crops' voxel size; None reads it from the image's affine (a MetaTensor).
        window_hu: the HU window the image was scaled to [0, 1] with; None for images in HU.
        prob: the probability of drawing a tumor for a crop.
        size: a size class or ``"mix"``.
        config: the rule engine's constants.
        mask_key: where the synthetic tumor's voxels go (bool).
        orig_key: where to keep the image before synthesis (None: not kept).
        orig_label_key: where to keep the label before synthesis (None: not kept).
        organ_key: where the tumor's organ goes, as an index into the task's organs.
        allow_missing_keys: as MONAI's.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        task: str = "liver",
        *,
        spacing_mm: Sequence[float] | None = None,
        window_hu: tuple[float, float] | None = None,
        prob: float = 1.0,
        size: str = "mix",
        config: SynthesisConfig | None = None,
        mask_key: str = "synth_mask",
        orig_key: str | None = "image_orig",
        orig_label_key: str | None = "label_orig",
        organ_key: str = "organ_index",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name the image and the label, got {self.keys}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError("prob must lie in [0, 1]")
        self.task = task
        self.spacing_mm = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)
        self.window_hu = None if window_hu is None else (float(window_hu[0]), float(window_hu[1]))
        self.prob = prob
        self.size = size
        self.config = config or SynthesisConfig()
        self.mask_key, self.orig_key, self.organ_key = mask_key, orig_key, organ_key
        self.orig_label_key = orig_label_key
        self.rng = np.random.default_rng(0)
        self.intensity_rng = self.rng
        self._do = True

    def intensity(self) -> IntensityModel | None:
        return RuleIntensity.for_region(TASKS[self.task].region, self.config, window_hu=self.window_hu)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandTumorSynthd:
        super().set_random_state(seed, state)
        self.rng = np.random.default_rng(seed if seed is not None else int(self.R.randint(2**31)))
        self.intensity_rng = self.rng
        return self

    def set_streams(self, geometry: int, intensity: int) -> RandTumorSynthd:
        """Seed the tumor's geometry (whether a tumor is drawn, where, its shape and texture) and its
        intensity change apart: two runs that differ only in the intensity draw the same tumors."""
        self.rng = np.random.default_rng(geometry)
        self.intensity_rng = np.random.default_rng(intensity)
        return self

    def randomize(self, data: Any = None) -> None:
        # Always one draw, whatever ``prob``: runs of another probability place the same tumors.
        self._do = bool(self.rng.random() < self.prob) or self.prob >= 1.0

    def _spacing(self, image: Any) -> tuple[float, ...]:
        if self.spacing_mm is not None:
            return self.spacing_mm
        affine = getattr(image, "affine", None)
        if affine is None:
            raise ValueError("the image carries no affine: pass spacing_mm")
        matrix = np.asarray(affine, dtype=np.float64)
        return tuple(float(s) for s in np.sqrt((matrix[:3, :3] ** 2).sum(axis=0)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key, label_key = self.keys
        image, label = d[image_key], d[label_key]
        self.randomize()
        img = convert_to_numpy(image, dtype=np.float32)[0]
        lab = convert_to_numpy(label)[0]
        result = None
        if self._do:
            result = synthesize_in_crop(
                img, lab, self.task, rng=self.rng, spacing_mm=self._spacing(image), intensity=self.intensity(),
                window_hu=self.window_hu, size=self.size, config=self.config, intensity_rng=self.intensity_rng,
            )  # fmt: skip
        if result is None:
            result = CropSynthesis(img, lab, np.zeros(lab.shape, bool), np.zeros(lab.shape, np.float32), 0)
        self._write(d, image, label, result)
        return d

    def _write(self, d: dict[Hashable, Any], image: Any, label: Any, result: CropSynthesis) -> None:
        image_key, label_key = self.keys
        if self.orig_key is not None:
            d[self.orig_key] = convert_to_dst_type(convert_to_numpy(image, dtype=np.float32).copy(), image)[0]
        if self.orig_label_key is not None:
            d[self.orig_label_key] = convert_to_dst_type(convert_to_numpy(label).copy(), label)[0]
        d[image_key] = convert_to_dst_type(result.image[None], image, dtype=image.dtype)[0]
        d[label_key] = convert_to_dst_type(result.label[None], label, dtype=label.dtype)[0]
        d[self.mask_key] = convert_to_dst_type(result.mask[None], image, dtype=bool)[0]
        d[self.organ_key] = convert_to_dst_type(np.array([result.organ_index]), image, dtype=np.int64)[0]


class RandTumorGeometryd(RandTumorSynthd):
    """The geometry of one synthetic tumor per crop, for a learned intensity: the image stays as it is.

    Adds ``profile_key`` (``blur(mask) · texture`` inside the organ, the change per unit of intensity),
    the tumor's voxels and its organ; the label marks the tumor. Arguments as :class:`RandTumorSynthd`.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        task: str = "liver",
        *,
        profile_key: str = "profile",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("orig_key", None)
        super().__init__(keys, task, **kwargs)
        self.profile_key = profile_key

    def intensity(self) -> IntensityModel | None:
        return None

    def _write(self, d: dict[Hashable, Any], image: Any, label: Any, result: CropSynthesis) -> None:
        super()._write(d, image, label, result)
        d[self.profile_key] = convert_to_dst_type(result.profile[None], image, dtype=np.float32)[0]
