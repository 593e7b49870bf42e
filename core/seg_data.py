"""Training data for segmentation: crops from the case store (or the raw files), online tumor synthesis,
augmentation, CutMix, quality control, seeded sampling.

The deterministic preprocessing of a case happens once, in ``prepare``'s store; a sample only samples
and reads its crops, and everything random runs on the crops. Every random draw of a sample is seeded
from (run seed, epoch, sample index), so a sample is the same whichever worker loads it and whether or
not the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli.core.errors import InputError
from freetumor_cli.core.label_maps import lookup_table
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.registry import REGIONS, TASKS
from freetumor_cli.core.store import CaseData, CaseSource, StoreMiss, stored_values
from freetumor_cli.core.synthesis_config import SynthesisConfig


def read_task_datalist(prepared: str | Path, task: str, fold: int) -> dict[str, list[dict[str, Any]]]:
    """The training and validation entries of ``prepared/datalists/<task>_fold<fold>.json``."""
    path = Path(prepared) / "datalists" / f"{task}_fold{fold}.json"
    if not path.is_file():
        raise InputError(
            f"data list not found: {path}",
            hint="run freetumor prepare first and check --organ and --fold",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        sections = {key: list(data.get(key, [])) for key in ("training", "validation")}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise InputError(
            f"data list {path} is damaged ({type(exc).__name__})", hint="run freetumor prepare again"
        ) from None
    folder = path.parent.absolute()
    out: dict[str, list[dict[str, Any]]] = {}
    for key, entries in sections.items():
        if not all(isinstance(e, dict) and e.get("image") for e in entries):
            raise InputError(f"data list {path}: every {key} entry needs an image", hint="run freetumor prepare again")
        # Paths are relative to the list's folder (absolute ones stay as they are).
        out[key] = [{**e, **{k: str(folder / e[k]) for k in ("image", "label") if e.get(k)}} for e in entries]
    check_files_exist(path, [e for entries in out.values() for e in entries])
    return out


def check_files_exist(source: Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a data list whose files are not there, before a run starts (a stat per file)."""
    from freetumor_cli.core.store import MOVED_HINT

    paths = {str(e[k]) for e in entries for k in ("image", "label") if e.get(k)}
    missing = sorted(p for p in paths if not os.path.isfile(p))
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(paths)} files in {source} are missing, e.g. {missing[0]}", hint=MOVED_HINT
        )


def stream_seed(*parts: object) -> int:
    """A 32-bit seed that depends on every one of ``parts`` (a random stream's address)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def sample_seed(seed: int, epoch: int, index: int, attempt: int = 0) -> int:
    """The seed of sample ``index`` of ``epoch`` (``attempt`` > 0: of its replacements, when it raised)."""
    return stream_seed(seed, epoch, index, *((attempt,) if attempt else ()))


# The random streams of a crop: where its crops are in the case (the sample's seed), then per crop the
# tumor's geometry, its intensity and the augmentation, each from (sample seed, crop, stream). Runs that
# differ only in how a tumor's intensity is made (rules, a generator, another contrast) or whether it is
# kept (quality control) insert the same tumor geometry into the same crop.
CROP_STREAMS = ("geometry", "intensity", "augment")


def crop_seeds(seed: int, crop: int) -> dict[str, int]:
    """The seeds of crop ``crop`` of the sample seeded ``seed``, one per stream of :data:`CROP_STREAMS`."""
    return {stream: stream_seed(seed, crop, stream) for stream in CROP_STREAMS}


@dataclass(frozen=True)
class Pipeline:
    """Preprocessing, crop sampling and augmentation settings of a training run."""

    task: str
    preprocessing: Preprocessing
    roi: tuple[int, int, int]
    crops_per_volume: int = 4
    pos: float = 1.0
    neg: float = 1.0
    synthesize: bool = False
    augment: bool = True
    geometry_only: bool = False
    synth_prob: float = 1.0


def task_lut(task_name: str) -> np.ndarray:
    """Lookup table from region label values to the task's (values the task does not keep become 0)."""
    return lookup_table(TASKS[task_name].region_to_task())


def sample_crop_origins(
    shape: Sequence[int],
    roi: Sequence[int],
    locations: Mapping[int, np.ndarray],
    counts: Mapping[int, int],
    foreground: Collection[int],
    *,
    pos: float,
    neg: float,
    num: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The first voxel of each of ``num`` crops of ``roi`` voxels from a case of ``shape``, as MONAI's
    positive/negative sampling picks them (``SpatialPadd`` then ``RandCropByPosNegLabeld``).

    Each crop is centred on a foreground voxel with probability ``pos / (pos + neg)`` (on a background
    body voxel otherwise; on the other kind when one is missing), drawn uniformly: a label value by its
    voxel count, then one of its stored locations. The crop is then moved to lie inside the case padded
    symmetrically to at least ``roi``; its origin may be negative (the padding).

    Args:
        shape: the case's shape. roi: the crop's shape.
        locations: label value -> ``(n, 3)`` voxel indices (a sample of that value's voxels).
        counts: label value -> voxel count. foreground: the label values that count as positive.
        pos, neg: the ratio. num: crops. rng: the sample's generator.
    """
    shape_a, roi_a = np.asarray(shape), np.asarray(roi)
    padded = np.maximum(shape_a, roi_a)
    pad_low = (padded - shape_a) // 2
    fg = [v for v in sorted(locations) if v in foreground and counts.get(v, 0) > 0 and len(locations[v])]
    bg = [v for v in sorted(locations) if v not in foreground and counts.get(v, 0) > 0 and len(locations[v])]
    origins = []
    for _ in range(num):
        pool = fg if (rng.random() < pos / (pos + neg) and fg) or not bg else bg
        if pool:
            weights = np.array([counts[v] for v in pool], dtype=np.float64)
            value = pool[int(rng.choice(len(pool), p=weights / weights.sum()))]
            center = locations[value][int(rng.integers(len(locations[value])))]
        else:
            center = shape_a // 2
        start = np.clip(center + pad_low - roi_a // 2, 0, padded - roi_a)
        origins.append(start - pad_low)
    return origins


def read_crop(array: Any, origin: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """``array[origin : origin + roi]``, zeros where the crop leaves the array (a numpy or blosc2 array)."""
    shape = np.asarray(array.shape)
    lo, hi = np.asarray(origin), np.asarray(origin) + np.asarray(roi)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, shape)
    out = np.zeros(tuple(int(n) for n in roi), dtype=array.dtype)
    if np.all(src_hi > src_lo):
        source = tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi, strict=True))
        target = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(src_lo, src_hi, lo, strict=True))
        out[target] = array[source]
    return out


def crop_transforms(p: Pipeline, synthesis: SynthesisConfig | None = None) -> Any:
    """The random part of a training sample, applied to each crop: online synthesis, then augmentation."""
    from monai import transforms as T

    from freetumor_cli.core.transforms import RandTumorGeometryd, RandTumorSynthd

    pp = p.preprocessing
    steps: list[Any] = []
    keys = ["image", "label"]
    where = {"spacing_mm": pp.spacing_mm, "window_hu": pp.window_hu, "config": synthesis, "prob": p.synth_prob}
    if p.geometry_only:
        steps.append(RandTumorGeometryd(["image", "label"], p.task, **where))
        keys = ["image", "label", "synth_mask", "profile", "label_orig"]
    elif p.synthesize:
        steps.append(RandTumorSynthd(["image", "label"], p.task, **where))
        keys = ["image", "label", "synth_mask", "image_orig", "label_orig"]
    if p.augment:
        steps += [
            T.RandFlipd(keys=keys, prob=0.2, spatial_axis=0),
            T.RandFlipd(keys=keys, prob=0.2, spatial_axis=1),
            T.RandFlipd(keys=keys, prob=0.2, spatial_axis=2),
            T.RandRotate90d(keys=keys, prob=0.2, max_k=3),
            T.RandShiftIntensityd(keys=["image"], offsets=0.1, prob=0.1),
        ]
        if REGIONS[pp.region].scale_augment:
            steps.append(T.RandScaleIntensityd(keys=["image"], factors=0.1, prob=0.1))
    steps.append(T.ToTensord(keys=keys, track_meta=False))
    return T.Compose(steps)


class CropDataset:
    """A map-style dataset of training samples: ``crops_per_volume`` crops of one case each.

    A sample reads its case from the store when it has it (only the crops' chunks are decompressed),
    else from the raw files through the same preprocessing; samples its crops; maps their labels into
    the task; and runs the random part on each crop. Every random draw is seeded from
    (seed, epoch, index), per crop and stream (:func:`crop_seeds`), so a sample is the same whichever
    worker or process loads it, whichever path it is read by, and whether or not the run was resumed; and
    runs that differ only in the tumors' intensity insert the same tumor into each crop. Each crop carries its ``sample_index`` and
    whether it came ``from_store``.
    """

    def __init__(
        self, entries: Sequence[dict[str, Any]], source: CaseSource, pipeline: Pipeline, transform: Any, seed: int
    ) -> None:
        import torch

        self.entries = list(entries)
        self.source = source
        self.pipeline = pipeline
        self.transform = transform
        self.seed = seed
        # Loader workers persist across epochs (starting them again every epoch costs about half a second,
        # a third of a short epoch's time): they read the epoch from shared memory (share_epoch), which
        # set_epoch fills before the epoch's iterator asks them for its first sample.
        self._epoch = torch.zeros((), dtype=torch.int64)
        self.lut = task_lut(pipeline.task)
        self.foreground = frozenset(TASKS[pipeline.task].region_to_task())

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def share_epoch(self) -> None:
        """Put the epoch in shared memory, for loader workers (in place: the workers see set_epoch); a
        run without workers needs none."""
        self._epoch.share_memory_()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        """Sample ``index`` of the epoch; a sample that raises is replaced by another, and the crops say so.

        A long run must not die on one bad sample (an unreadable case, a crop that trips a bug): the
        sample is drawn again from the next case with a fresh seed, up to :data:`MAX_REPLACEMENTS`
        times, and every failure travels with the crops (``incidents``) for the run's log and metrics.
        Only when every replacement fails too does the error stop the run.
        """
        import torch

        incidents: list[dict[str, Any]] = []
        epoch = self.epoch
        for attempt in range(MAX_REPLACEMENTS + 1):
            position = (index + attempt) % len(self.entries)
            seed = sample_seed(self.seed, epoch, index, attempt)
            try:
                crops = self._sample(position, seed, incidents)
            except MemoryError:
                raise
            except Exception as exc:
                incidents.append(
                    {
                        "kind": "bad_sample",
                        "epoch": epoch,
                        "sample": index,
                        "case": case_name(self.entries[position]),
                        "seed": seed,
                        "error": one_line(exc),
                    }
                )
                continue
            for crop in crops:
                crop["sample_index"] = torch.tensor([index])
            crops[0]["incidents"] = incidents
            return crops
        first = incidents[0]
        raise SampleError(
            f"sample {index} and {MAX_REPLACEMENTS} replacements failed; the first: case {first['case']} "
            f"(seed {first['seed']}): {first['error']}",
            hint="check the cases named in run.log, or leave them out with freetumor prepare --datasets",
        )

    def _sample(self, position: int, seed: int, incidents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The crops of the case at ``position`` drawn with ``seed`` (a damaged store case is read raw)."""
        import torch
        from monai.data import get_track_meta, set_track_meta

        from freetumor_cli.core.transforms import RandTumorSynthd

        entry = self.entries[position]
        case = self.source.load(entry)
        p = self.pipeline
        origins = sample_crop_origins(
            case.shape, p.roi, case.locations, case.counts, self.foreground,
            pos=p.pos, neg=p.neg, num=p.crops_per_volume, rng=np.random.default_rng(seed),
        )  # fmt: skip
        try:
            pairs = read_checked_crops(case, origins, p.roi)
        except StoreMiss as exc:
            incidents.append(
                {"kind": "store_damaged", "case": case_name(entry), "error": f"{exc}; read from its raw files"}
            )
            case = self.source.load_raw(entry)
            pairs = read_checked_crops(case, origins, p.roi)
        crops = []
        tracking = get_track_meta()
        set_track_meta(False)  # crops carry no geometry: MONAI's metadata tracking would only cost time
        try:
            for k, (image, label) in enumerate(pairs):
                seeds = crop_seeds(seed, k)
                self.transform.set_random_state(seed=seeds["augment"])
                for t in self.transform.transforms:
                    if isinstance(t, RandTumorSynthd):  # RandTumorGeometryd included
                        t.set_streams(seeds["geometry"], seeds["intensity"])
                mapped = self.lut[label].astype(np.float32)
                # numpy through the random part; its last transform (ToTensord) makes the tensors
                crop = self.transform({"image": image[None], "label": mapped[None]})
                crop["from_store"] = torch.tensor([case.origin == "store"])
                crops.append(crop)
        finally:
            set_track_meta(tracking)
        return crops


MAX_REPLACEMENTS = 8  # samples tried in place of one that raised, before the run stops


class SampleError(InputError):
    """A training sample and every replacement tried for it raised."""


def case_name(entry: Mapping[str, Any]) -> str:
    """How the logs name a case: ``dataset/case``, or its image's path."""
    if entry.get("dataset") and entry.get("case"):
        return f"{entry['dataset']}/{entry['case']}"
    return str(entry.get("image", "?"))


def one_line(exc: BaseException) -> str:
    """The error's type and first line; through MONAI's "applying transform" wrapper, the error it wraps."""
    while isinstance(exc, RuntimeError) and str(exc).startswith("applying transform") and exc.__cause__:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def read_checked_crops(
    case: CaseData, origins: Sequence[np.ndarray], roi: Sequence[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The image (float32) and region labels (uint8) of each crop; a stored crop is checked as it is read
    (:func:`~freetumor_cli.core.store.stored_values`: a damaged one raises ``StoreMiss``)."""
    return [stored_values(case, origin, read=lambda array, at: read_crop(array, at, roi)) for origin in origins]


def case_for_validation(source: CaseSource, entry: dict[str, Any], task: str) -> tuple[np.ndarray, np.ndarray]:
    """A validation case's whole image (float32) and task labels on the preprocessed grid (a damaged stored
    case is read from its raw files)."""
    _, image, label = source.whole(entry)
    return image, task_lut(task)[label]


def cutmix_along_axis(images: Any, labels: Any, rng: np.random.Generator, *, alpha: float = 0.2) -> tuple[Any, Any]:
    """CutMix along one random spatial axis: a slab of each crop is replaced by another crop's.

    Shapes ``(B, C, X, Y, Z)``; the slab's share of the axis is drawn from Beta(alpha, alpha).
    """
    import torch

    batch = images.shape[0]
    if batch < 2:
        return images, labels
    share = float(rng.beta(alpha, alpha))
    axis = 2 + rng.integers(3).item()
    perm = torch.as_tensor(rng.permutation(batch), device=images.device)
    cut = round(share * images.shape[axis])
    if cut == 0:
        return images, labels
    index = [slice(None)] * images.ndim
    index[axis] = slice(0, cut)
    slab = tuple(index)
    images, labels = images.clone(), labels.clone()
    images[slab] = images[perm][slab]
    labels[slab] = labels[perm][slab]
    return images, labels


def found_share(predicted: Any, mask: Any, tumor_class: int) -> float:
    """The quality-control measure: the share of a tumor's voxels (``mask``, bool) that a segmentor's
    label map ``predicted`` (the argmax of its output; numpy or torch, the mask's shape) calls
    ``tumor_class``; 0 for an empty mask. Training (:func:`quality_control`), the generator's held-out
    scoring and the paired experiment's audit all measure tumors with it."""
    voxels = int(mask.sum())
    if voxels == 0:
        return 0.0
    return float((predicted[mask] == tumor_class).sum()) / voxels


def passes_quality_control(share: float, threshold: float) -> bool:
    """A synthetic tumor is kept when the segmentor finds more than ``threshold`` of it."""
    return share > threshold


def quality_control(
    probabilities: Any, synth_mask: Any, tumor_classes: Sequence[int], threshold: float
) -> tuple[list[bool], list[float]]:
    """Keep a synthetic tumor when the baseline calls more than ``threshold`` of its voxels tumor.

    Args:
        probabilities: the baseline's softmax output, ``(B, K, X, Y, Z)``.
        synth_mask: bool ``(B, 1, X, Y, Z)``, the synthetic tumor voxels of each crop (may be empty).
        tumor_classes: per crop, the baseline channel meaning tumor of the crop's organ.
        threshold: share of voxels needed (strictly more).

    Returns:
        (accepted per crop, the share per crop; crops without a synthetic tumor are not accepted, share 0).
    """
    predicted = probabilities.argmax(dim=1)
    shares = [found_share(predicted[b], synth_mask[b, 0].bool(), cls) for b, cls in enumerate(tumor_classes)]
    accepted = [bool(synth_mask[b].any()) and passes_quality_control(s, threshold) for b, s in enumerate(shares)]
    return accepted, shares


@dataclass
class SegBatch:
    """A training batch on the device, all ``(B, 1, X, Y, Z)`` but ``organ_index`` (``(B,)``).

    Attributes:
        image: the crops as the network will see them.
        label: task labels (synthetic tumors included while accepted).
        synth_mask: where synthetic tumors were inserted (None without online synthesis).
        image_orig: the crops before synthesis (None without online synthesis).
        label_orig: their labels before synthesis (None without online synthesis).
        profile: blur(mask) · texture of the tumors, for the learned engine (None with the rules).
        organ_index: each crop's tumor organ, an index into the task's organs.
    """

    image: Any
    label: Any
    synth_mask: Any = None
    image_orig: Any = None
    label_orig: Any = None
    profile: Any = None
    organ_index: Any = None

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> SegBatch:
        mask = batch.get("synth_mask")
        return cls(
            image=batch["image"], label=batch["label"], synth_mask=None if mask is None else mask.bool(),
            image_orig=batch.get("image_orig", batch["image"] if "profile" in batch else None),
            label_orig=batch.get("label_orig"),
            profile=batch.get("profile"),
            organ_index=batch["organ_index"].reshape(-1) if "organ_index" in batch else None,
        )  # fmt: skip


def tumor_organs(batch: SegBatch, task_name: str) -> tuple[list[str], Any]:
    """Each crop's tumor organ (by name) and that organ's voxels before synthesis (``(B, 1, X, Y, Z)``, bool)."""
    from freetumor_cli.core.gan import organ_voxels

    task = TASKS[task_name]
    organs = [task.organs[int(i)] for i in batch.organ_index.tolist()]
    value_of = {name: value for value, name in task.organ_values.items()}
    return organs, organ_voxels(batch.label, batch.synth_mask, [value_of[o] for o in organs])


def learned_intensity(batch: SegBatch, generator: Any, task_name: str, channels: Mapping[str, int]) -> SegBatch:
    """The generator's map in place of the rule-based scalar (no gradients).

    Each crop's map depends on that crop alone, as the generator was trained and as the original runs
    it (one crop at a time): its batch norm normalises each crop on its own (or uses running statistics).
    ``channels`` gives the generator's output channel of each organ of the task.
    """
    import torch

    from freetumor_cli.core.gan import compose, intensity_map

    task = TASKS[task_name]
    organs, organ_mask = tumor_organs(batch, task_name)
    with torch.no_grad():
        change = intensity_map(generator(batch.image_orig), [channels[o] for o in organs], task.region, organ_mask)
    image = compose(batch.image_orig, batch.profile, change, float(REGIONS[task.region].tumor_sign))
    return replace(batch, image=image)


@dataclass(frozen=True)
class QualityControlStats:
    """What quality control saw in one batch: crops with a synthetic tumor, those kept, their mean share."""

    seen: int
    kept: int
    share: float


def quality_controlled(
    batch: SegBatch, baseline: Any, channels: Mapping[str, int], task_name: str, threshold: float, autocast: Any
) -> tuple[SegBatch, QualityControlStats]:
    """Keep each synthetic tumor the baseline finds (more than ``threshold`` of its voxels called tumor);
    a rejected crop goes back to its original image, and its tumor voxels back to the organ.

    Args:
        batch: a batch with online synthesis.
        baseline: the frozen baseline segmentor.
        channels: organ -> the baseline's output channel meaning its tumor.
        task_name: the run's task (the batch's ``organ_index`` points into its organs).
        threshold: the share of voxels needed.
        autocast: the accelerator's autocast context factory.
    """
    import torch

    has = batch.synth_mask.flatten(1).any(1)
    if not bool(has.any()):
        return batch, QualityControlStats(0, 0, 0.0)
    organs = TASKS[task_name].organs
    with torch.no_grad(), autocast():
        probs = torch.softmax(baseline(batch.image).float(), 1)
    tumor_channels = [channels[organs[int(i)]] for i in batch.organ_index.tolist()]
    accepted, shares = quality_control(probs, batch.synth_mask, tumor_channels, threshold)
    image, label = batch.image.clone(), batch.label.clone()
    for b, ok in enumerate(accepted):
        if bool(has[b]) and not ok:
            image[b] = batch.image_orig[b]
            label[b] = batch.label_orig[b]
    present = has.tolist()
    stats = QualityControlStats(
        seen=int(has.sum()),
        kept=sum(ok for ok, h in zip(accepted, present, strict=True) if h),
        share=float(np.mean([sh for sh, h in zip(shares, present, strict=True) if h])),
    )
    return replace(batch, image=image, label=label), stats
