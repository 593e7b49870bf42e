"""Each stage's configuration: pure data, cheap to import (the command line shows its defaults).

One frozen dataclass per stage: :class:`PrepareConfig`, :class:`TrainSegConfig`,
:class:`TrainSynthConfig`, :class:`EvaluateConfig` (``synthesize``'s is
:class:`~freetumor_cli.core.synthesis_config.SynthesizeConfig`). Each is also importable from its stage's
module (``core/prepare.py``, ``core/train_seg.py``, ...). Nothing here imports the numeric stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

from freetumor_cli.core.errors import ConfigError
from freetumor_cli.core.models import ModelName
from freetumor_cli.core.preprocess import PreprocessConfig
from freetumor_cli.core.registry import (
    PREPARE_LABEL_SCHEMES,
    REGIONS,
    TASKS,
    EvalSpaceName,
    OneOf,
    RegionName,
    TaskName,
    check_at_least,
    check_choices,
    engine_of,
)
from freetumor_cli.core.synthesis_config import SynthesisConfig


@dataclass(frozen=True)
class PrepareConfig:
    """How ``prepare`` scans, validates and splits.

    Attributes:
        datasets: dataset folders to use (names or aliases); empty means every known folder found.
        folds: number of cross-validation folds.
        seed: fold assignment seed (folds are a hash of seed, dataset and case id).
        strict: fail when any case is skipped.
        verify_images: read every image fully (catches truncated files; slower than headers only).
        organ_masks: a folder of organ masks (by case id) merged into tumor labels that lack their organ.
        store: write the case store (each case preprocessed, read a crop at a time by training).
        preprocessing: the preprocessing constants.
        label_scheme: how the organ labels of organ-only and ``--pairs`` datasets are encoded:
            ``freetumor`` (the region's label space), ``totalsegmentator`` (TotalSegmentator v2 "total"
            ids: liver, pancreas, both kidneys, lung lobes) or ``auto``: a known dataset's in the region's
            space (as the Hugging Face dataset's are), others read as ``synthesize`` reads them (an
            ambiguous map is skipped with the reason). Tumor datasets keep their own conventions.
    """

    datasets: tuple[str, ...] = ()
    folds: int = 5
    seed: int = 0
    strict: bool = False
    verify_images: bool = False
    organ_masks: str | None = None
    store: bool = True
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    label_scheme: Annotated[str, OneOf(PREPARE_LABEL_SCHEMES)] = "auto"

    def __post_init__(self) -> None:
        check_choices(self)
        if self.folds < 2:
            raise ValueError("folds must be at least 2")


GENERALIST_REPEATS = {"Dataset003_Liver": 4, "Dataset007_Pancreas": 2, "Dataset220_KiTS2023": 1}


@dataclass(frozen=True)
class TrainSegConfig:
    """A segmentation run (defaults are the method's, DESIGN §7).

    ``task`` is what the network predicts (a registry task); ``mode`` how it is trained: ``onlylabeled``
    (real tumors only; the baseline) or ``freesyn`` (real plus online synthetic tumors). Left unset,
    ``epochs`` and ``labelled_repeats`` default by mode (100 and ×1 for ``onlylabeled``, 20 and ×10 for
    ``freesyn``), ``roi`` and ``spacing_mm`` by the task's region (96³ at 1.5 mm for the abdomen,
    192 × 192 × 32 at 1.25 × 1.25 × 5 mm for the chest): :meth:`resolved` fills them in. The generalist
    (``all``) oversamples its tumor datasets ×4 (LiTS), ×2 (MSD pancreas), ×1 (KiTS) unless
    ``dataset_repeats`` says otherwise. ``synth`` is ``rules`` or a generator (a train-synth checkpoint or
    the authors' ``TGAN.pt``); ``synth_prob`` is the chance that a ``freesyn`` crop with an organ gets a
    synthetic tumor (1, the method's; 0 trains on the same crops without synthesis, for ablations);
    ``init`` starts the network from a checkpoint (VoCo's self-supervised weights, or a freetumor
    checkpoint). CutMix applies in both modes, as in the original.
    """

    task: TaskName = "liver"
    mode: Literal["onlylabeled", "freesyn"] = "onlylabeled"
    fold: int = 0
    model: ModelName = "swinunetr"
    epochs: int | None = None
    max_steps: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 2.0
    roi: tuple[int, int, int] | None = None
    crops_per_volume: int = 4
    volumes_per_batch: int = 1
    pos: float = 1.0
    neg: float = 1.0
    labelled_repeats: int | None = None
    dataset_repeats: dict[str, int] | None = None
    synth: str = "rules"
    init: str | None = None
    qc_threshold: float = 0.7
    synth_prob: float = 1.0
    cutmix: bool = True
    cutmix_alpha: float = 0.2
    val_every: int = 1
    val_min_steps: int = 10
    overlap: float = 0.75
    save_every_steps: int = 100
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_accum: int = 1
    workers: int = 2
    seed: int = 0
    augment: bool = True
    spacing_mm: tuple[float, float, float] | None = None
    rules: SynthesisConfig = field(default_factory=SynthesisConfig)

    def resolved(self) -> TrainSegConfig:
        """This configuration with every default that depends on the mode or the region filled in.

        Raises:
            ConfigError: a combination that cannot work (SwinUNETR on a crop it cannot take).
        """
        region = REGIONS[TASKS[self.task].region]
        config = replace(
            self,
            epochs=self.epochs if self.epochs is not None else (100 if self.mode == "onlylabeled" else 20),
            labelled_repeats=self.labelled_repeats
            if self.labelled_repeats is not None
            else (1 if self.mode == "onlylabeled" else 10),
            roi=self.roi or region.roi,
            spacing_mm=self.spacing_mm or region.spacing_mm,
            dataset_repeats=self.dataset_repeats
            if self.dataset_repeats is not None
            else (GENERALIST_REPEATS if self.task == region.generalist_task else {}),
        )
        assert config.roi is not None
        cells = [n // 32 for n in config.roi]
        if config.model == "swinunetr" and (any(n % 32 for n in config.roi) or cells[0] * cells[1] * cells[2] < 2):
            raise ConfigError(
                f"SwinUNETR needs a crop whose sides are multiples of 32 and larger than 32³, got {list(config.roi)}",
                hint="e.g. --set roi=[96,96,96] (the abdomen's) or [192,192,32] (the chest's); or use --model unet",
            )
        return config

    def __post_init__(self) -> None:
        check_choices(self)
        check_at_least(
            self, fold=0, epochs=1, max_steps=1, lr=1e-12, weight_decay=0, warmup_epochs=0, crops_per_volume=1,
            volumes_per_batch=1, pos=0, neg=0, labelled_repeats=1, cutmix_alpha=1e-6, val_every=1, val_min_steps=1, overlap=0,
            save_every_steps=1, grad_accum=1, workers=0, seed=0,
        )  # fmt: skip
        if not 0 <= self.qc_threshold <= 1:
            raise ValueError("qc_threshold must lie in [0, 1]")
        if not 0 <= self.synth_prob <= 1:
            raise ValueError("synth_prob must lie in [0, 1]")
        if not self.overlap < 1 or self.pos + self.neg <= 0:
            raise ValueError("overlap must be below 1, and pos + neg above 0")
        synth = Path(self.synth)
        if self.engine == "generator" and not (
            (synth / "generator.json").is_file() or (synth.is_file() and synth.suffix in (".pt", ".pth"))
        ):
            raise ValueError(
                f"synth must be 'rules', a generator checkpoint folder of train-synth or TGAN.pt, got {self.synth!r}"
            )

    def repeats(self, dataset: str) -> int:
        """How many times a tumor-labelled case of ``dataset`` appears in an epoch (of a resolved config)."""
        assert self.labelled_repeats is not None and self.dataset_repeats is not None
        return self.labelled_repeats * self.dataset_repeats.get(dataset, 1)

    @property
    def engine(self) -> str:
        """The synthesis engine ``synth`` names: ``rules``, or ``generator`` for a checkpoint's path."""
        return engine_of(self.synth)


@dataclass(frozen=True)
class TrainSynthConfig:
    """A generator run (the method's defaults, DESIGN §6).

    ``roi`` and ``spacing_mm`` default to the critic's (the crop and voxel size it was trained on), and
    another value than the critic's is refused; ``adversarial_weight`` defaults to the region's (0.1
    abdomen, 0.5 chest). Crops are sampled as the original does: 4 volumes × 1 crop per step, centred on
    the organs (pos:neg 1:0), the tumor datasets oversampled (LiTS ×200, MSD pancreas ×100, KiTS ×100;
    ``labelled_repeats`` sets one factor for all). ``init`` starts from a generator: a train-synth
    checkpoint or the authors' ``TGAN.pt`` (whose ``netSeg`` is then the critic unless one is given).
    """

    region: RegionName = "abdomen"
    epochs: int = 100
    max_steps: int | None = None
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.999)
    roi: tuple[int, int, int] | None = None
    crops_per_volume: int = 1
    volumes_per_batch: int = 4
    pos: float = 1.0
    neg: float = 0.0
    labelled_repeats: int | None = None
    dataset_repeats: dict[str, int] = field(
        default_factory=lambda: {"Dataset003_Liver": 200, "Dataset007_Pancreas": 100, "Dataset220_KiTS2023": 100}
    )
    init: str | None = None
    base_channels: int = 32
    adversarial_weight: float | None = None
    qc_threshold: float = 0.7
    heldout_crops: int = 16
    save_every_steps: int = 100
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    workers: int = 2
    seed: int = 0
    spacing_mm: tuple[float, float, float] | None = None
    rules: SynthesisConfig = field(default_factory=SynthesisConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        check_at_least(
            self, epochs=1, max_steps=1, lr=1e-12, labelled_repeats=1, base_channels=1, heldout_crops=0,
            save_every_steps=1, workers=0, seed=0,
        )  # fmt: skip
        if not 0 <= self.qc_threshold <= 1:
            raise ValueError("qc_threshold must lie in [0, 1]")
        if (
            self.crops_per_volume < 1
            or self.volumes_per_batch < 1
            or self.pos < 0
            or self.neg < 0
            or self.pos + self.neg == 0
        ):
            raise ValueError("crops_per_volume and volumes_per_batch must be >= 1, pos and neg >= 0 and not both 0")

    def repeats(self, dataset: str) -> int:
        """How many times a tumor-labelled case of ``dataset`` appears in an epoch."""
        if self.labelled_repeats is not None:
            return self.labelled_repeats
        return self.dataset_repeats.get(dataset, max(self.dataset_repeats.values(), default=1))

    def weight(self) -> float:
        if self.adversarial_weight is not None:
            return self.adversarial_weight
        return REGIONS[self.region].adversarial_weight


@dataclass(frozen=True)
class EvaluateConfig:
    """How predictions are scored.

    Attributes:
        label_space: the label space of both folders: a region's (``abdomen``, ``chest``) or a
            specialist task's (``task``: 0 background, 1 organ, 2 tumor).
        classes: class names or values to score; empty means the tumor classes of the scheme.
        tolerance_mm: normalized surface Dice tolerance.
        min_lesion_voxels: connected components smaller than this are ignored.
        lesion_iou: 0 counts any overlap as a detection; otherwise the IoU a match needs.
        skip_missing: skip cases without a prediction instead of scoring them as empty.
        resample_pred: resample predictions on another grid onto the ground truth's (nearest neighbour).
    """

    label_space: EvalSpaceName = "abdomen"
    classes: tuple[str, ...] = ()
    tolerance_mm: float = 2.0
    min_lesion_voxels: int = 1
    lesion_iou: float = 0.0
    skip_missing: bool = False
    resample_pred: bool = False

    def __post_init__(self) -> None:
        check_choices(self)
        if self.tolerance_mm < 0:
            raise ValueError("tolerance_mm must be >= 0")
        if self.min_lesion_voxels < 1:
            raise ValueError("min_lesion_voxels must be >= 1")
        if not 0 <= self.lesion_iou <= 1:
            raise ValueError("lesion_iou must lie in [0, 1]")
