"""freetumor inside nnU-Net v2: online tumor synthesis in its training patches, and raw datasets for it.

nnU-Net trains on patches cut from its preprocessed cases: intensities normalised per channel (a CT
channel by ``CTNormalization``: clipped to the dataset's foreground percentiles 0.5 and 99.5, minus
their mean, divided by their standard deviation), voxels at the configuration's spacing, labels as
``dataset.json`` names them, and ``-1`` where a patch reaches beyond its case. This module reads those
facts from the plans and ``dataset.json`` (:func:`patch_synthesis`) and inserts a rule-based tumor into
one patch (:func:`synthesize_in_patch`) through the same array function as the MONAI transforms
(:func:`~freetumor_cli.core.transforms.synthesize_in_labelled_crop`): the tumor's HU change becomes
``change / std`` and the result stays within the clipped range.

It also writes an nnU-Net raw dataset from a prepared folder (:func:`write_nnunet_dataset`), organ-only
and tumor-labelled cases together, and names the folder nnU-Net searches for the trainer
(:func:`trainer_folder`, for ``nnUNet_extTrainer``).

Nothing here imports nnU-Net or torch: the batchgeneratorsv2 transform and the trainer that do live in
:mod:`freetumor_cli.core.nnunet_trainer`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli import __version__
from freetumor_cli.core import PathLike
from freetumor_cli.core.cases import read_datalist
from freetumor_cli.core.config import build_config, to_dict
from freetumor_cli.core.engines import RuleIntensity
from freetumor_cli.core.errors import ConfigError, InputError, OutputExistsError
from freetumor_cli.core.io import load_header, load_volume, save_volume
from freetumor_cli.core.label_maps import integer_labels, relabel
from freetumor_cli.core.outputs import OutputLock, atomic_path, write_text_atomic
from freetumor_cli.core.parallel import process_pool
from freetumor_cli.core.registry import ORGANS, TASKS, SizeName, check_choices, task
from freetumor_cli.core.synthesis_config import NNUNET_DATASET_NAME, SynthesisConfig
from freetumor_cli.core.transforms import CropLabels, CropSynthesis, LabelledOrgan, synthesize_in_labelled_crop

TRAINER_NAME = "nnUNetTrainerFreeTumor"
CONFIG_ENV = "FREETUMOR_NNUNET_CONFIG"  # a YAML file of NnunetSynthesisConfig keys
SET_ENV = "FREETUMOR_NNUNET_SET"  # "key=value key=value", as --set
SETTINGS_FILE = "freetumor_synthesis.json"  # what the trainer synthesizes, beside nnU-Net's files in the fold
RECORDS_FOLDER = "freetumor"  # in a raw dataset: where its cases came from
CT_NORMALIZATION = "CTNormalization"


@dataclass(frozen=True)
class NnunetSynthesisConfig:
    """What ``nnUNetTrainerFreeTumor`` does to each training patch.

    Set in a YAML file named by ``$FREETUMOR_NNUNET_CONFIG``, as ``key=value`` items in
    ``$FREETUMOR_NNUNET_SET``, or as the class attribute ``synthesis`` of a subclass of the trainer.

    Attributes:
        prob: the probability that a patch holding an organ and no real tumor gets a tumor.
        size: a size class, or ``mix`` (a class among those the organ's part in the patch can hold).
        organs: the organs that get tumors; empty: every organ ``dataset.json`` names with its tumor.
        labels: organ name -> ``[organ value, tumor value]`` in the dataset's labels, for label names
            freetumor does not recognise (or region-based labels); replaces what the names say.
        seed: the seed of the tumors' random stream.
        rules: the rule-based engine's constants (``rules.abdomen_hu_change``, ...).
    """

    prob: float = 1.0
    size: SizeName = "mix"
    organs: tuple[str, ...] = ()
    labels: dict[str, tuple[int, int]] = field(default_factory=dict)
    seed: int = 0
    rules: SynthesisConfig = field(default_factory=SynthesisConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        for name in self.organs:
            if name not in ORGANS:
                raise ValueError(f"organs: unknown organ {name!r}; choose among {', '.join(ORGANS)}")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {self.prob}")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")
        for name in self.labels:
            if name not in ORGANS:
                raise ValueError(f"labels: unknown organ {name!r}; choose among {', '.join(ORGANS)}")


def synthesis_config_from_env(
    defaults: NnunetSynthesisConfig | None = None, environ: Mapping[str, str] | None = None
) -> NnunetSynthesisConfig:
    """``defaults`` (a trainer's own), then the file ``$FREETUMOR_NNUNET_CONFIG``, then ``$FREETUMOR_NNUNET_SET``.

    Raises:
        ConfigError: an unknown key, a wrong value, an unreadable file.
    """
    env = os.environ if environ is None else environ
    file = env.get(CONFIG_ENV) or None
    try:
        overrides = shlex.split(env.get(SET_ENV, ""))
    except ValueError as exc:
        raise ConfigError(
            f"${SET_ENV} cannot be read: {exc}", hint="write key=value items separated by spaces"
        ) from None
    return build_config(NnunetSynthesisConfig, file=file, overrides=overrides, defaults=defaults)


@dataclass(frozen=True)
class CtIntensity:
    """nnU-Net's ``CTNormalization`` of one channel: clip to [lower, upper] HU, minus mean, divided by std.

    Attributes:
        mean, std: of the dataset's foreground voxels, in HU.
        lower, upper: their 0.5 and 99.5 percentiles, in HU.
    """

    mean: float
    std: float
    lower: float
    upper: float

    @classmethod
    def from_properties(cls, properties: Mapping[str, Any]) -> CtIntensity:
        """From one channel of the plans' ``foreground_intensity_properties_per_channel``."""
        try:
            return cls(
                float(properties["mean"]),
                float(properties["std"]),
                float(properties["percentile_00_5"]),
                float(properties["percentile_99_5"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"the plans' foreground intensity properties lack {exc}",
                hint="run nnUNetv2_plan_and_preprocess again",
            ) from None

    @property
    def per_hu(self) -> float:
        """Normalised units per HU (nnU-Net divides by at least 1e-8)."""
        return 1.0 / max(self.std, 1e-8)

    @property
    def value_range(self) -> tuple[float, float]:
        """The normalised values a patch can hold: the clipped HU range, normalised."""
        return ((self.lower - self.mean) * self.per_hu, (self.upper - self.mean) * self.per_hu)

    def normalise(self, hu: np.ndarray) -> np.ndarray:
        """HU to nnU-Net's normalised values (float32), as its preprocessing does."""
        return ((np.clip(hu, self.lower, self.upper) - self.mean) * self.per_hu).astype(np.float32)


@dataclass(frozen=True)
class PatchSynthesis:
    """What synthesis in one dataset's patches needs: plain data, read once from plans and ``dataset.json``.

    Attributes:
        labels: the organs that get tumors, their values and their tumors' values.
        intensity: the CT channel's normalisation.
        channel: the CT channel of the image.
        spacing_mm: the configuration's voxel size, in the patch's axis order.
        body_axis: the patch axis along the body (the image files' slice axis).
        config: the settings.
    """

    labels: CropLabels
    intensity: CtIntensity
    channel: int
    spacing_mm: tuple[float, float, float]
    body_axis: int
    config: NnunetSynthesisConfig

    @property
    def rule(self) -> RuleIntensity:
        """The rule engine's intensity change, in normalised units."""
        return replace(RuleIntensity.for_region(self.labels.region, self.config.rules), scale=self.intensity.per_hu)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly record of what is synthesized, for the run folder."""
        return {
            "freetumor_version": __version__,
            "organs": [{"organ": o.name, "label": o.value, "tumor_label": o.tumor_value} for o in self.labels.organs],
            "ct_channel": self.channel,
            "ct_normalization": to_dict(self.intensity),
            "hu_change": list(self.rule.hu_change),
            "normalised_change_per_hu": self.intensity.per_hu,
            "value_range": list(self.intensity.value_range),
            "spacing_mm": list(self.spacing_mm),
            "body_axis": self.body_axis,
            "settings": to_dict(self.config),
        }


def patch_synthesis(
    dataset_labels: Mapping[str, Any],
    *,
    spacing: Sequence[float],
    normalization_schemes: Sequence[str],
    intensity_properties: Mapping[str, Mapping[str, Any]],
    transpose_forward: Sequence[int] = (0, 1, 2),
    config: NnunetSynthesisConfig | None = None,
) -> PatchSynthesis:
    """Read what synthesis in a dataset's training patches needs from its plans and ``dataset.json``.

    Args:
        dataset_labels: ``dataset.json``'s ``labels`` (name -> value).
        spacing: the configuration's spacing (the plans' ``configurations.<name>.spacing``).
        normalization_schemes: the configuration's normalisation per channel.
        intensity_properties: the plans' ``foreground_intensity_properties_per_channel``.
        transpose_forward: the plans' axis order of the preprocessed arrays.
        config: the settings.

    Raises:
        ConfigError: no single CT channel, a 2D configuration, organs or tumors the labels do not name.
    """
    config = config or NnunetSynthesisConfig()
    if len(spacing) != 3:
        raise ConfigError(
            f"online tumor synthesis needs a 3D configuration; this one has {len(spacing)} axes",
            hint="train 3d_fullres (or 3d_lowres)",
        )
    ct = [c for c, scheme in enumerate(normalization_schemes) if scheme == CT_NORMALIZATION]
    if len(ct) != 1:
        found = "no channel is" if not ct else f"channels {ct} are"
        raise ConfigError(
            f"tumors go into one CT channel, and {found} normalised with {CT_NORMALIZATION}",
            hint="name the CT channel 'CT' in dataset.json's channel_names and plan again",
        )
    channel = ct[0]
    properties = intensity_properties.get(str(channel))
    if properties is None:
        raise InputError(
            f"the plans hold no foreground intensity properties of channel {channel}",
            hint="run nnUNetv2_plan_and_preprocess again",
        )
    # nnU-Net's readers put an image file's last voxel axis (the slice axis of an axial CT) first;
    # transpose_forward then moves it.
    body_axis = list(transpose_forward).index(0)
    return PatchSynthesis(
        labels=organ_labels(dataset_labels, config),
        intensity=CtIntensity.from_properties(properties),
        channel=channel,
        spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        body_axis=body_axis,
        config=config,
    )


_TUMOR_WORDS = ("tumor", "tumour", "cancer", "lesion", "mass", "metastasis")


def _words(name: str) -> tuple[str, ...]:
    """A label name as lower-case words, plurals made singular: ``Liver Tumors`` -> (liver, tumor)."""
    known = (*ORGANS, *_TUMOR_WORDS)
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    singular = {"masses": "mass", "metastases": "metastasis"}
    return tuple(singular.get(w, w[:-1] if w.endswith("s") and w[:-1] in known else w) for w in words)


def organ_labels(dataset_labels: Mapping[str, Any], config: NnunetSynthesisConfig) -> CropLabels:
    """The organs a dataset's labels name, with their tumors: ``liver`` with ``liver_tumor`` (or
    ``liver tumour``, ``liver lesions``, ...); a lone ``tumor``, ``cancer`` or ``lesion`` when one organ is
    named. ``config.labels`` gives the values of organs whose names differ; ``config.organs`` chooses.

    Raises:
        ConfigError: no organ with a tumor label, an asked organ missing, region-based values.
    """
    organs: dict[str, Any] = {}
    tumors: dict[str, Any] = {}
    generic: list[Any] = []
    for name, value in dataset_labels.items():
        words = _words(name)
        if len(words) == 1 and words[0] in ORGANS:
            organs[words[0]] = value
        elif len(words) == 2 and words[0] in ORGANS and words[1] in _TUMOR_WORDS:
            tumors[words[0]] = value
        elif len(words) == 1 and words[0] in _TUMOR_WORDS:
            generic.append(value)
    if len(organs) == 1 and len(generic) == 1 and not tumors:
        tumors[next(iter(organs))] = generic[0]
    values = {name: (organs[name], tumors[name]) for name in organs if name in tumors}
    values.update(config.labels)
    chosen = list(config.organs) or list(values)
    if not chosen:
        known = ", ".join(f"{o}/{o}_tumor" for o in ORGANS)
        raise ConfigError(
            f"dataset.json names no organ with its tumor ({known}); its labels: {', '.join(dataset_labels)}",
            hint=f"set labels, e.g. {SET_ENV}='labels.liver=[1,2]'",
        )
    found: list[LabelledOrgan] = []
    allowed = {v for v in dataset_labels.values() if isinstance(v, int) and not isinstance(v, bool)}
    for name in chosen:
        if name not in values:
            raise ConfigError(
                f"dataset.json names no {name} with its tumor ({name} and {name}_tumor)",
                hint=f"set labels, e.g. {SET_ENV}='labels.{name}=[1,2]', or choose other organs",
            )
        organ_value, tumor_value = values[name]
        for what, value in ((name, organ_value), (f"{name} tumor", tumor_value)):
            if not isinstance(value, int) or value not in allowed:
                raise ConfigError(
                    f"the {what} label {value!r} is not one of dataset.json's integer labels {sorted(allowed)}",
                    hint=f"region-based labels need explicit values: set labels, e.g. {SET_ENV}='labels.{name}=[1,2]'",
                )
        found.append(LabelledOrgan(name, int(organ_value), int(tumor_value)))
    try:
        return CropLabels(tuple(found))
    except ValueError as exc:
        raise ConfigError(f"organs {', '.join(chosen)}: {exc}", hint="check the organs and labels settings") from None


def synthesize_in_patch(
    image: np.ndarray,
    segmentation: np.ndarray,
    setup: PatchSynthesis,
    rng: np.random.Generator,
    *,
    in_place: bool = False,
) -> CropSynthesis | None:
    """Insert one tumor into an organ of an nnU-Net training patch that holds an organ and no real tumor.

    Args:
        image: the patch, shape ``(C, X, Y, Z)``, normalised as nnU-Net's preprocessing does.
        segmentation: its labels, shape ``(X, Y, Z)``; ``-1`` (padding) is neither organ nor tumor.
        setup: the dataset's facts (:func:`patch_synthesis`).
        rng: the only source of randomness.
        in_place: write the tumor into ``image`` (float32) and ``segmentation`` (integers) themselves.

    Returns:
        The CT channel with its tumor (``image``), the labels with it, the tumor's voxels; None when no
        tumor was drawn (no organ, a real tumor, an organ part too small).
    """
    return synthesize_in_labelled_crop(
        image[setup.channel], segmentation, setup.labels, rng=rng, spacing_mm=setup.spacing_mm,
        intensity=setup.rule, value_range=setup.intensity.value_range, body_axis=setup.body_axis,
        size=setup.config.size, config=setup.config.rules, in_place=in_place,
    )  # fmt: skip


def trainer_folder() -> Path:
    """The folder to put in ``nnUNet_extTrainer``: one module there imports ``nnUNetTrainerFreeTumor``.

    nnU-Net imports every module of that folder by its bare name, so the folder holds nothing else; the
    trainer itself lives in :mod:`freetumor_cli.core.nnunet_trainer`, importable (and picklable) from
    nnU-Net's worker processes.
    """
    from freetumor_cli.core.nnunet_ext import FOLDER

    return FOLDER


# ---------------------------------------------------------------------------------------------------
# A raw nnU-Net dataset from a prepared folder


@dataclass
class NnunetDatasetResult:
    """What :func:`write_nnunet_dataset` did.

    Attributes:
        folder: the dataset's folder (``<out>/DatasetNNN_Name``).
        written: cases written by this run.
        reused: cases a previous run had written.
        roles: cases per role (``tumor-labelled``, ``organ-only``).
    """

    folder: Path
    written: int
    reused: int
    roles: dict[str, int]


def nnunet_case_id(dataset: str, case: str) -> str:
    """The nnU-Net case identifier of a prepared case: ``<dataset>_<case>``, other characters than
    letters, digits, ``-`` and ``.`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{dataset}_{case}")


def write_nnunet_dataset(
    prepared: PathLike,
    out: PathLike,
    dataset: str,
    *,
    task_name: str = "all",
    copy: bool = False,
    workers: int = 1,
    on_start: Callable[[int], None] | None = None,
    on_case_done: Callable[[str], None] | None = None,
) -> NnunetDatasetResult:
    """Write a raw nnU-Net v2 dataset from a prepared folder: every case of a task, organ-only or not.

    ``<out>/<dataset>/imagesTr/<id>_0000.nii.gz`` are the CTs (symbolic links to them, or copies with
    ``copy``); ``labelsTr/<id>.nii.gz`` their labels in the task's space (``all``: the abdomen's 7 classes,
    ``covid``: the chest's), on the image's own grid; ``dataset.json``; and in ``freetumor/``:
    ``cases.json`` (each case's source, dataset and role) and ``splits_final.json`` (prepare's folds in
    nnU-Net's form). A rerun adds what is missing; an interrupted run loses nothing. ``workers``
    processes write the labels.

    Raises:
        ConfigError: a dataset name nnU-Net does not accept, or its number taken by another dataset.
        InputError: no prepared folder, or no case of the task in it.
        OutputExistsError: the dataset's folder holds another dataset.
    """
    spec = task(task_name)
    if not NNUNET_DATASET_NAME.fullmatch(dataset):
        raise ConfigError(
            f"the dataset name must read DatasetNNN_Name (nnU-Net's naming), got {dataset!r}",
            hint="e.g. Dataset501_FreeTumor",
        )
    entries = _task_cases(Path(prepared), task_name)
    root = Path(out)
    number = dataset[len("Dataset") : len("Dataset") + 3]
    if root.is_dir():
        clash = sorted(p.name for p in root.glob(f"Dataset{number}_*") if p.name != dataset)
        if clash:
            raise ConfigError(
                f"{root} already holds dataset {number} as {clash[0]}: nnU-Net finds datasets by number",
                hint="choose another number",
            )
    folder = root / dataset
    ids: dict[str, dict[str, Any]] = {}
    for entry in entries:
        case_id = nnunet_case_id(entry["dataset"], entry["case"])
        if case_id in ids:
            raise InputError(f"two prepared cases are both nnU-Net case {case_id}", hint="rename one of them")
        ids[case_id] = entry
    source = {"task": task_name, "copy": copy}
    with OutputLock(folder, "nnunet dataset"):
        _claim(folder, source)
        if on_start:
            on_start(len(ids))
        jobs = [(folder, case_id, entry, spec.region_to_task(), copy) for case_id, entry in ids.items()]
        written = reused = 0
        pool = process_pool(workers) if workers > 1 else None
        try:
            done = pool.map(_write_case_job, jobs, chunksize=8) if pool else map(_write_case_job, jobs)
            for case_id, wrote in done:
                written, reused = written + wrote, reused + (not wrote)
                if on_case_done:
                    on_case_done(case_id)
        finally:
            if pool:
                pool.shutdown()
        _write_index(folder, ids, task_name, folds=_prepared_folds(Path(prepared)))
    roles: dict[str, int] = {}
    for entry in ids.values():
        roles[entry.get("role", "unknown")] = roles.get(entry.get("role", "unknown"), 0) + 1
    return NnunetDatasetResult(folder, written, reused, roles)


def _task_cases(prepared: Path, task_name: str) -> list[dict[str, Any]]:
    """Every case of a task in a prepared folder (its fold-0 data list holds them all, in two parts)."""
    if not (prepared / "manifest.jsonl").is_file():
        raise InputError(f"{prepared} is not a prepared folder (no manifest.jsonl)", hint="run freetumor prepare first")
    datalist = prepared / "datalists" / f"{task_name}_fold0.json"
    if not datalist.is_file():
        raise InputError(
            f"{prepared} holds no case of the task {task_name}",
            hint=f"choose a task it has: {', '.join(sorted({p.name.split('_fold')[0] for p in (prepared / 'datalists').glob('*_fold0.json')}))}",
        )
    return read_datalist(datalist)


def _claim(folder: Path, source: dict[str, Any]) -> None:
    """Record what the folder holds; refuse a folder that holds something else."""
    record = folder / RECORDS_FOLDER / "source.json"
    if record.is_file():
        previous = json.loads(record.read_text(encoding="utf-8"))
        if {k: previous.get(k) for k in source} != source:
            raise OutputExistsError(
                f"{folder} holds a dataset written with other settings ({previous.get('task')} task, "
                f"{'copies' if previous.get('copy') else 'links'})",
                hint="choose another dataset name, or the same settings to complete it",
            )
    elif any((folder / sub).exists() for sub in ("imagesTr", "labelsTr", "dataset.json")):
        raise OutputExistsError(
            f"{folder} holds a dataset that freetumor did not write", hint="choose another dataset name"
        )
    write_text_atomic(record, json.dumps({**source, "freetumor_version": __version__}, indent=2) + "\n")


def _write_case_job(job: tuple[Path, str, Mapping[str, Any], Mapping[int, int], bool]) -> tuple[str, bool]:
    folder, case_id, entry, remap, copy = job
    return case_id, _write_case(folder, case_id, entry, remap, copy=copy)


def _write_case(folder: Path, case_id: str, entry: Mapping[str, Any], remap: Mapping[int, int], *, copy: bool) -> bool:
    """Write one case's label and image unless both are there; True when something was written."""
    image_out = folder / "imagesTr" / f"{case_id}_0000.nii.gz"
    label_out = folder / "labelsTr" / f"{case_id}.nii.gz"
    if image_out.exists() and label_out.exists():
        return False
    image = Path(entry["image"])
    header = load_header(image, what="image")
    labels = load_volume(entry["label"], what="labels")
    if labels.shape != header.shape:
        raise InputError(f"{case_id}: labels of shape {labels.shape} on an image of {header.shape}")
    save_volume(relabel(integer_labels(labels.array), remap), header, label_out, label=True)
    if image.name.endswith(".nii.gz"):
        if copy:
            with atomic_path(image_out) as tmp:
                shutil.copyfile(image, tmp)
        else:
            with atomic_path(image_out) as tmp:
                tmp.unlink()
                tmp.symlink_to(image.resolve())
    else:  # an uncompressed source: nnU-Net wants one file ending
        ct = load_volume(image, what="image")
        save_volume(np.asarray(ct.array), ct, image_out)
    return True


def _plain(value: Any) -> Any:
    return str(value.resolve()) if isinstance(value, Path) else value


def _prepared_folds(prepared: Path) -> int | None:
    """The number of folds a prepared folder was split into (None when its record does not say)."""
    try:
        folds = json.loads((prepared / "prepare_config.json").read_text(encoding="utf-8"))["folds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(folds) if isinstance(folds, int) else None


def _write_index(folder: Path, ids: Mapping[str, Mapping[str, Any]], task_name: str, *, folds: int | None) -> None:
    spec = TASKS[task_name]
    labels = spec.labels
    index = {
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in sorted(labels.items())},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
        "description": f"freetumor {task_name} cases, tumor-labelled and organ-only (freetumor {__version__})",
    }
    write_text_atomic(folder / "dataset.json", json.dumps(index, indent=2) + "\n")
    cases = {
        case_id: {k: _plain(entry.get(k)) for k in ("dataset", "case", "role", "fold", "image", "label")}
        for case_id, entry in ids.items()
    }
    write_text_atomic(folder / RECORDS_FOLDER / "cases.json", json.dumps(cases, indent=1) + "\n")
    if folds is None:
        folds = max((int(e["fold"]) + 1 for e in ids.values() if e.get("fold") is not None), default=0)
    splits = [
        {
            "train": sorted(i for i, e in ids.items() if e.get("fold") != fold),
            "val": sorted(i for i, e in ids.items() if e.get("fold") == fold),
        }
        for fold in range(folds)
    ]
    write_text_atomic(folder / RECORDS_FOLDER / "splits_final.json", json.dumps(splits, indent=1) + "\n")
