"""The deterministic preprocessing of CT for networks: one definition for every stage.

:class:`Preprocessing` says how a region's CT (and its labels) is brought onto a network's grid and
intensity range: reoriented (RAS), resampled to the network's spacing (bilinear for the image, nearest
for labels), windowed to [0, 1] (clipped), and cropped to the body (foreground). ``prepare`` (its cache),
``train-seg`` and ``train-synth`` (training and validation), ``evaluate --checkpoint`` and the learned
engine of ``synthesize`` all build their MONAI transforms from it, so a network sees at inference
exactly what it saw in training. Its :meth:`~Preprocessing.digest` names the result.

MONAI is imported only when transforms are built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from freetumor_cli.core.registry import REGIONS, RegionName, check_choices


@dataclass(frozen=True)
class Preprocessing:
    """The deterministic chain of one region.

    Attributes:
        region: the region (label space) of the data.
        spacing_mm: voxel size after resampling, per axis of ``orientation``.
        window_hu: HU range mapped to [0, 1]; values outside are clipped.
        orientation: axis codes the volumes are reoriented to.
        crop_foreground: crop to the box where the windowed image is above 0 (training data only).
    """

    region: RegionName
    spacing_mm: tuple[float, float, float]
    window_hu: tuple[float, float]
    orientation: str = "RAS"
    crop_foreground: bool = True

    def __post_init__(self) -> None:
        check_choices(self)
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be three positive sizes, got {list(self.spacing_mm)}")
        if self.window_hu[0] >= self.window_hu[1]:
            raise ValueError(f"window_hu must be low < high, got {list(self.window_hu)}")

    @classmethod
    def for_region(
        cls,
        region: str,
        *,
        spacing_mm: Sequence[float] | None = None,
        window_hu: Sequence[float] | None = None,
        orientation: str | None = None,
        crop_foreground: bool = True,
    ) -> Preprocessing:
        """The region's preprocessing (its registry spacing and window unless given)."""
        r = REGIONS[region]
        spacing = tuple(float(s) for s in (spacing_mm if spacing_mm is not None else r.spacing_mm))
        window = tuple(float(w) for w in (window_hu if window_hu is not None else r.window_hu))
        return cls(region, spacing, window, orientation or r.orientation, crop_foreground)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        """The chain from its JSON form (``dataclasses.asdict``, lists for tuples)."""
        return cls.for_region(
            str(data["region"]), spacing_mm=data["spacing_mm"], window_hu=data["window_hu"],
            orientation=data.get("orientation"), crop_foreground=bool(data.get("crop_foreground", True)),
        )  # fmt: skip

    def digest(self) -> str:
        """A short hash of the chain: equal digests give equal arrays from equal inputs."""
        text = json.dumps({"format": 1, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def transforms(
        self, keys: Sequence[str] = ("image", "label"), *, load: bool = True, crop_foreground: bool | None = None
    ) -> list[Any]:
        """The MONAI dictionary transforms of the chain.

        Args:
            keys: the image key first (bilinear), then label keys (nearest neighbour).
            load: start with ``LoadImaged`` + ``EnsureChannelFirstd`` (values are file paths);
                without, the values must be channel-first ``MetaTensor``s with their affine.
            crop_foreground: override :attr:`crop_foreground` (prediction keeps the whole volume so that
                it can be inverted onto the input's grid).
        """
        from monai import transforms as T

        keys = list(keys)
        modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
        steps: list[Any] = []
        if load:
            steps += [T.LoadImaged(keys=keys, image_only=True), T.EnsureChannelFirstd(keys=keys)]
        steps += [
            T.Orientationd(keys=keys, axcodes=self.orientation, labels=None),
            T.Spacingd(keys=keys, pixdim=self.spacing_mm, mode=modes),
            T.ScaleIntensityRanged(
                keys=keys[0], a_min=self.window_hu[0], a_max=self.window_hu[1], b_min=0.0, b_max=1.0, clip=True
            ),
        ]
        if self.crop_foreground if crop_foreground is None else crop_foreground:
            steps.append(T.CropForegroundd(keys=keys, source_key=keys[0], allow_smaller=True))
        return steps


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing of every region, as configured for ``prepare`` (``preprocessing.*`` keys).

    Defaults are the registry's (DESIGN §4). :meth:`for_region` gives one region's :class:`Preprocessing`.
    """

    orientation: str = "RAS"
    abdomen_spacing_mm: tuple[float, float, float] = REGIONS["abdomen"].spacing_mm
    chest_spacing_mm: tuple[float, float, float] = REGIONS["chest"].spacing_mm
    abdomen_window_hu: tuple[float, float] = REGIONS["abdomen"].window_hu
    chest_window_hu: tuple[float, float] = REGIONS["chest"].window_hu
    crop_foreground: bool = True

    def for_region(self, region: str) -> Preprocessing:
        return Preprocessing.for_region(
            region,
            spacing_mm=getattr(self, f"{region}_spacing_mm", None),  # a region without keys: the registry's
            window_hu=getattr(self, f"{region}_window_hu", None),
            orientation=self.orientation,
            crop_foreground=self.crop_foreground,
        )
