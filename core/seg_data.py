"""Training data for segmentation: MONAI transforms, online tumor synthesis, CutMix, seeded sampling.

Every random draw of a sample is seeded from (run seed, epoch, sample index), so a sample is the same
whichever worker loads it and whether or not the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli.core.errors import InputError
from freetumor_cli.core.preprocess import Preprocessing, task_remap_transform
from freetumor_cli.core.registry import ORGANS, REGIONS, TASKS
from freetumor_cli.core.synthesis_config import SynthesisConfig


def read_task_datalist(prepared: str | Path, task: str, fold: int) -> dict[str, list[dict[str, Any]]]:
    """The training and validation entries of ``prepared/datalists/<task>_fold<fold>.json``."""
    path = Path(prepared) / "datalists" / f"{task}_fold{fold}.json"
    if not path.is_file():
        raise InputError(
            f"data list not found: {path}",
            hint="run freetumor prepare first and check --organ and --fold",
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return {"training": data.get("training", []), "validation": data.get("validation", [])}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class OnlineSynthesisd:
    """Insert one rule-based tumor into every crop that holds an organ and no real tumor.

    Works on [0, 1]-windowed crops: the engine's HU changes are divided by the window's width. Adds
    ``synth_mask`` (the synthetic tumor voxels) and ``image_orig`` (the crop before synthesis) for the
    quality-control step on the device.
    """

    def __init__(
        self,
        task: str,
        *,
        spacing_mm: Sequence[float],
        window_hu: tuple[float, float],
        config: SynthesisConfig | None = None,
        size: str = "mix",
    ) -> None:
        from dataclasses import replace

        base = config or SynthesisConfig()
        width = float(window_hu[1] - window_hu[0])
        self.config = replace(
            base,
            abdomen_hu_change=tuple(v / width for v in base.abdomen_hu_change),
            lung_hu_change=tuple(v / width for v in base.lung_hu_change),
        )
        self.task = task
        self.spacing = tuple(float(s) for s in spacing_mm)
        self.size = size
        self.rng = np.random.default_rng(0)

    def set_random_state(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def _draw(self, img: np.ndarray, lab: np.ndarray) -> tuple[int, Any] | None:
        """One rule-based tumor in an organ of the crop, when it has an organ and no real tumor.

        Returns (organ value, :class:`SynthesisResult`), or None when nothing was drawn (no organ, a real
        tumor present, or the organ part in this crop too small for a tumor: the crop stays as it is).
        """
        from freetumor_cli.core.errors import FreetumorError
        from freetumor_cli.core.tumor import synthesize_in_organ

        organs = TASKS[self.task].organ_values
        present = [v for v in organs if (lab == v).sum() >= 8]
        if not present or any((lab == v + 1).any() for v in organs):
            return None
        value = present[int(self.rng.integers(len(present)))]
        try:
            result = synthesize_in_organ(
                img, lab == value, ORGANS[organs[value]], spacing=self.spacing,
                affine=np.diag([*self.spacing, 1.0]), rng=self.rng, size=self.size, count=1, config=self.config,
            )  # fmt: skip
        except FreetumorError:
            return None
        return value, result

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        import torch

        lab = np.asarray(data["label"][0]).astype(np.int64)
        img = np.asarray(data["image"][0], dtype=np.float32)
        synth = np.zeros(lab.shape, dtype=bool)
        data["image_orig"] = torch.as_tensor(img[None]).clone()
        drawn = self._draw(img, lab)
        if drawn is not None:
            value, result = drawn
            img[result.bbox] = np.clip(result.image, 0.0, 1.0)
            synth[result.bbox] = result.tumor_mask
            lab[synth] = value + 1
        data["image"] = torch.as_tensor(img[None])
        data["label"] = torch.as_tensor(lab[None].astype(np.float32))
        data["synth_mask"] = torch.as_tensor(synth[None])
        return data


class TumorGeometryd(OnlineSynthesisd):
    """Rule-based tumor geometry for the learned generator: the crop stays as it is.

    Adds ``synth_mask`` (the tumor voxels), ``profile`` (the engine's blur(mask) · texture inside the
    organ, i.e. its intensity change per unit of HU change) and ``organ_index`` (the tumor's organ, as
    an index into the task's organs). The label marks the tumor too.
    """

    def __init__(
        self,
        task: str,
        *,
        spacing_mm: Sequence[float],
        window_hu: tuple[float, float],
        config: SynthesisConfig | None = None,
    ) -> None:
        from dataclasses import replace

        unit = replace(config or SynthesisConfig(), abdomen_hu_change=(1.0, 1.0), lung_hu_change=(1.0, 1.0))
        super().__init__(task, spacing_mm=spacing_mm, window_hu=(0.0, 1.0), config=unit, size="mix")

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        import torch

        lab = np.asarray(data["label"][0]).astype(np.int64)
        img = np.asarray(data["image"][0], dtype=np.float32)
        synth = np.zeros(lab.shape, dtype=bool)
        profile = np.zeros(lab.shape, dtype=np.float32)
        organ_index = 0  # crops without a tumor: the task's first organ (nothing reads it there)
        drawn = self._draw(img, lab)
        if drawn is not None:
            value, result = drawn
            box_profile = np.zeros(result.tumor_mask.shape, dtype=np.float32)
            for box, delta in result.patches:
                box_profile[box] += np.abs(delta)
            profile[result.bbox] = box_profile
            synth[result.bbox] = result.tumor_mask
            lab[synth] = value + 1
            organ_index = TASKS[self.task].organs.index(TASKS[self.task].organ_values[value])
        data["label"] = torch.as_tensor(lab[None].astype(np.float32))
        data["synth_mask"] = torch.as_tensor(synth[None])
        data["profile"] = torch.as_tensor(profile[None])
        data["organ_index"] = torch.tensor([organ_index])
        return data


@dataclass(frozen=True)
class Pipeline:
    """Preprocessing and augmentation settings of a training run."""

    task: str
    preprocessing: Preprocessing
    roi: tuple[int, int, int]
    crops_per_volume: int = 4
    pos: float = 1.0
    neg: float = 1.0
    synthesize: bool = False
    augment: bool = True
    geometry_only: bool = False


def load_transforms(p: Pipeline) -> list[Any]:
    """Deterministic part: the region's preprocessing (load, orient, resample, window, crop), then the task remap."""
    return [*p.preprocessing.transforms(("image", "label")), task_remap_transform(p.task)]


def train_transforms(p: Pipeline, synthesis: SynthesisConfig | None = None) -> Any:
    from monai import transforms as T

    pp = p.preprocessing
    steps = [
        *load_transforms(p),
        T.SpatialPadd(keys=["image", "label"], spatial_size=p.roi),
        T.RandCropByPosNegLabeld(
            keys=["image", "label"],
            label_key="label",
            spatial_size=p.roi,
            pos=p.pos,
            neg=p.neg,
            num_samples=p.crops_per_volume,
            image_key="image",
            image_threshold=0,
        ),
    ]
    keys = ["image", "label"]
    if p.geometry_only:
        steps.append(TumorGeometryd(p.task, spacing_mm=pp.spacing_mm, window_hu=pp.window_hu, config=synthesis))
        keys = ["image", "label", "synth_mask", "profile"]
    elif p.synthesize:
        steps.append(OnlineSynthesisd(p.task, spacing_mm=pp.spacing_mm, window_hu=pp.window_hu, config=synthesis))
        keys = ["image", "label", "synth_mask", "image_orig"]
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


class SeededDataset:
    """A map-style dataset whose random transforms are seeded per (seed, epoch, index)."""

    def __init__(self, entries: Sequence[dict[str, Any]], transform: Any, seed: int) -> None:
        self.entries = list(entries)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Any:
        seed = sample_seed(self.seed, self.epoch, index)
        self.transform.set_random_state(seed=seed)
        for t in self.transform.transforms:
            if isinstance(t, OnlineSynthesisd):  # TumorGeometryd included
                t.set_random_state(seed + 1)
        entry = {k: self.entries[index][k] for k in ("image", "label")}
        return self.transform(entry)


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
    accepted, shares = [], []
    for b, cls in enumerate(tumor_classes):
        mask = synth_mask[b, 0].bool()
        voxels = int(mask.sum())
        if voxels == 0:
            accepted.append(False)
            shares.append(0.0)
            continue
        share = float((predicted[b][mask] == cls).float().mean())
        shares.append(share)
        accepted.append(share > threshold)
    return accepted, shares
