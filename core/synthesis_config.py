"""Configuration of tumor synthesis: pure data, cheap to import (the command line reads its defaults).

:class:`SynthesisConfig` holds the rule-based engine's constants (DESIGN §5, in millimetres and
Hounsfield units); :class:`SynthesizeConfig` everything that decides what ``freetumor synthesize``
produces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Annotated, Any

from freetumor_cli.core.registry import (
    REGIONS,
    SIZE_CLASSES,
    EngineName,
    LabelSchemeName,
    OneOf,
    OrganName,
    SizeName,
    check_choices,
)

SIZE_CHOICES: tuple[str, ...] = (*SIZE_CLASSES, "mix")
MAX_TUMORS = 100  # per output: beyond, an organ is more tumor than organ
MAX_COPIES = 1000
LAYOUTS: tuple[str, ...] = ("flat", "nnunet", "monai")  # where synthesize's outputs go (SynthesizeConfig.layout)
NNUNET_DATASET_NAME = re.compile(r"Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_-]*")  # nnU-Net's DatasetNNN_Name


@dataclass(frozen=True)
class SizeClass:
    """One tumor size class.

    Attributes:
        radius_mm: base radius R; each axis radius is drawn in ``radius_jitter`` × R.
        elastic_sigma_mm: range of the elastic displacement strength (standard deviation, mm).
        count: range (inclusive) of tumors per call when the count is not fixed.
    """

    radius_mm: float
    elastic_sigma_mm: tuple[float, float]
    count: tuple[int, int]


@dataclass(frozen=True)
class SynthesisConfig:
    """Constants of the rule-based engine (DESIGN §5), in millimetres and Hounsfield units.

    The originals are given in voxels at 1.5 mm; they are converted here (× 1.5).
    """

    tiny: SizeClass = SizeClass(6.0, (0.75, 1.5), (3, 10))
    small: SizeClass = SizeClass(12.0, (1.5, 3.0), (3, 10))
    medium: SizeClass = SizeClass(24.0, (4.5, 9.0), (2, 5))
    large: SizeClass = SizeClass(48.0, (7.5, 15.0), (1, 3))
    radius_jitter: tuple[float, float] = (0.75, 1.25)
    # The classes ``mix`` draws from (empty: every class the organ holds), e.g. (tiny, small) for
    # training crops too small to hold a larger tumor.
    mix_sizes: tuple[str, ...] = ()
    # Texture: the recipe's grid is texture_spacing_mm; it is computed texture_bin times coarser
    # (binomial counts of its Bernoulli samples), then resampled to the image's voxels.
    texture_spacing_mm: float = 1.5
    texture_bin: int = 2
    texture_sigma_a_mm: float = 4.5
    texture_base: tuple[float, float] = (0.04, 0.06)
    texture_scale: tuple[float, float] = (0.19, 0.21)
    texture_sigma_b_mm: float = 6.0
    texture_threshold: float = 0.12
    texture_mean: tuple[float, float] = (0.5, 0.55)
    # The chest's textures: the original's 10 (σa in {3, 6, 9, 12, 15} × σb in {4, 7} voxels of 1.5 mm),
    # one drawn per lesion. The abdomen uses the single texture above (σa 3, σb 4 voxels).
    lung_texture_sigmas_mm: tuple[tuple[float, float], ...] = tuple(
        (1.5 * a, 1.5 * b) for a in (3, 6, 9, 12, 15) for b in (4, 7)
    )
    edge_sigma_mm: tuple[float, float] = (1.5, 3.0)
    # Intensity change in HU, multiplied by texture and blurred mask. Abdomen tumors get darker
    # (SyntheticTumors' calibrated drop), lung lesions brighter (ground-glass to consolidation).
    abdomen_hu_change: tuple[float, float] = (65.0, 145.0)
    lung_hu_change: tuple[float, float] = (250.0, 500.0)
    # Placement.
    min_depth_fraction: float = 0.5
    center_slab: tuple[float, float] = (0.3, 0.7)
    placement_grid_mm: float = 5.0
    min_kept_fraction: float = 0.3
    max_placement_attempts: int = 20
    # At most this share of an organ's voxels becomes tumor in one call, so no size or --count turns an
    # organ into tumor: a first tumor that would pass it is drawn again (max_placement_attempts times;
    # mix then tries the smaller classes) and is an error if none fits; a later one is not placed, nor
    # any after it (a note says so).
    max_tumor_share: float = 0.3

    def hu_change(self, region: str) -> tuple[float, float]:
        """The range of the intensity change (HU, a magnitude; its sign is the region's) in ``region``."""
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}")
        return self.lung_hu_change if region == "chest" else self.abdomen_hu_change

    def texture_for(self, region: str, rng: Any) -> SynthesisConfig:
        """The texture constants of one tumor: the chest draws one of its textures, the abdomen keeps its own."""
        if region != "chest" or not self.lung_texture_sigmas_mm:
            return self
        sigma_a, sigma_b = self.lung_texture_sigmas_mm[int(rng.integers(len(self.lung_texture_sigmas_mm)))]
        return replace(self, texture_sigma_a_mm=sigma_a, texture_sigma_b_mm=sigma_b)

    def size_class(self, name: str) -> SizeClass:
        if name not in SIZE_CLASSES:
            raise ValueError(f"unknown size class {name!r}; choose one of {', '.join(SIZE_CHOICES)}")
        return getattr(self, name)

    def __post_init__(self) -> None:
        for name in SIZE_CLASSES:
            sc = getattr(self, name)
            if sc.radius_mm <= 0 or sc.count[0] < 1 or sc.count[1] < sc.count[0]:
                raise ValueError(f"size class {name}: radius must be > 0 and count a range of >= 1")
        for key in (
            "radius_jitter",
            "texture_base",
            "texture_scale",
            "texture_mean",
            "edge_sigma_mm",
            "abdomen_hu_change",
            "lung_hu_change",
            "center_slab",
        ):
            low, high = getattr(self, key)
            if low > high or low < 0:
                raise ValueError(f"{key} must be a range low <= high of non-negative values")
        if not 0 <= self.min_depth_fraction <= 1.5:
            raise ValueError("min_depth_fraction must lie in [0, 1.5]")
        unknown = [n for n in self.mix_sizes if n not in SIZE_CLASSES]
        if unknown:
            raise ValueError(f"mix_sizes: unknown size class {unknown[0]!r}; choose among {', '.join(SIZE_CLASSES)}")
        if not 0 < self.max_tumor_share <= 1:
            raise ValueError("max_tumor_share must lie in (0, 1]")


DEFAULT_NNUNET_DATASET = "Dataset501_Synthetic"


@dataclass(frozen=True)
class SynthesizeConfig:
    """Everything that decides what ``synthesize`` produces (written into each JSON sidecar).

    Attributes:
        organ: target organ.
        size: size class, or ``mix``: with a ``count``, a class per tumor among those that fit; with
            ``count`` None, one class per output, then its count from that class's range.
        count: tumors per output; None draws it from the size class's range.
        radius_mm: exact base radius in mm; overrides ``size``.
        seed: the run's seed; each case and copy draws from its own stream of (seed, case id, copy).
        copies: variants per input.
        engine: ``rules`` (no training needed) or ``generator`` (the learned intensity change).
        generator: with ``engine=generator``, a generator checkpoint folder from ``train-synth``.
        label_scheme: how to read the organ labels.
        preview: also write a PNG of each tumor, before and after.
        overwrite: replace existing outputs.
        layout: ``flat`` (every file in the output folder), ``nnunet`` (a raw nnU-Net v2 dataset
            ``<dataset>/imagesTr``, ``labelsTr``, ``dataset.json``) or ``monai`` (flat, plus a MONAI data list).
        dataset: with ``layout=nnunet``, the dataset's folder name, ``DatasetNNN_Name``.
        rules: constants of the rule-based engine.
    """

    organ: OrganName = "liver"
    size: SizeName = "mix"
    count: int | None = 1
    radius_mm: float | None = None
    seed: int = 0
    copies: int = 1
    engine: EngineName = "rules"
    generator: str | None = None
    label_scheme: LabelSchemeName = "auto"
    preview: bool = False
    overwrite: bool = False
    layout: Annotated[str, OneOf(LAYOUTS)] = "flat"
    dataset: str = DEFAULT_NNUNET_DATASET
    rules: SynthesisConfig = SynthesisConfig()

    def __post_init__(self) -> None:
        check_choices(self)
        if self.count is not None and not 1 <= self.count <= MAX_TUMORS:
            raise ValueError(f"count must lie in 1..{MAX_TUMORS} (tumors per output)")
        if not 1 <= self.copies <= MAX_COPIES:
            raise ValueError(f"copies must lie in 1..{MAX_COPIES}")
        if self.radius_mm is not None and self.radius_mm <= 0:
            raise ValueError("radius_mm must be positive")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")
        if self.engine == "generator" and not self.generator:
            raise ValueError("engine generator needs a generator checkpoint (--generator PATH)")
        if self.layout != "nnunet" and self.dataset != DEFAULT_NNUNET_DATASET:
            raise ValueError(
                f"dataset {self.dataset!r} names the folder of layout nnunet (--dataset with --layout nnunet); "
                f"layout {self.layout} has none"
            )
        if self.layout == "nnunet" and not NNUNET_DATASET_NAME.fullmatch(self.dataset):
            raise ValueError(
                f"dataset must read DatasetNNN_Name (nnU-Net's naming, e.g. Dataset501_LiverSynth), got {self.dataset!r}"
            )
        if self.engine == "rules" and self.generator:
            raise ValueError(
                "a generator is given but the engine is rules: drop --generator, or use --engine generator"
            )
