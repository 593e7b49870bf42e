"""The online synthesis and the training data path, exercised by drawing thousands of samples.

A multi-day run draws millions of crops: every organ shape a crop can cut out of a real organ must give
either a valid synthetic tumor or none, never an exception. These tests draw organ parts that are
thin oblique slivers (a crop's face cutting an organ's surface), single voxels, organs touching every
face of the crop, and random blobs, for every task, with the rule engine and geometry only.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from freetumor_cli.core.engines import RuleIntensity
from freetumor_cli.core.registry import REGIONS, TASKS
from freetumor_cli.core.synthesis_config import SynthesisConfig
from freetumor_cli.core.transforms import synthesize_in_crop

RULES = SynthesisConfig()


def sliver(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """An oblique sheet 1-2 voxels thick, often nearly parallel to an axis (where a strided grid misses it)."""
    normal = rng.normal(size=3)
    if rng.random() < 0.5:
        normal[rng.integers(3)] *= 6.0
    normal /= np.linalg.norm(normal)
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    distance = (grid - rng.uniform(0.2, 0.8, 3) * np.array(shape)) @ normal
    return (np.abs(distance) < rng.uniform(0.3, 1.0)).reshape(shape)


def diagonal_sheet(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One voxel layer i + j + k = c: a 3-voxel grid step misses it two times in three."""
    i, j, k = np.indices(shape)
    return (i + j + k) == int(rng.integers(sum(shape) // 4, 3 * sum(shape) // 4))


def few_voxels(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    n = int(rng.integers(1, 12))
    mask[tuple(rng.integers(0, s, n) for s in shape)] = True
    return mask


def cap_at_a_face(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A large ellipsoid whose center lies outside the crop: only a thin cap reaches in through one face."""
    axis, side = int(rng.integers(3)), int(rng.integers(2))
    radii = rng.uniform(1.5, 4.0, 3) * np.array(shape)
    center = rng.uniform(0.2, 0.8, 3) * np.array(shape)
    depth = rng.uniform(0.3, 4.0)  # voxels of the cap inside the crop
    center[axis] = (-radii[axis] + depth) if side == 0 else (shape[axis] - 1 + radii[axis] - depth)
    grid = np.indices(shape, dtype=np.float32)
    return (((grid - center[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1


def touching_every_face(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """An organ filling most of the crop, cut by all six faces."""
    grid = np.indices(shape, dtype=np.float32)
    center = (np.array(shape) - 1) / 2 + rng.uniform(-2, 2, 3)
    radii = np.array(shape) * rng.uniform(0.55, 0.75, 3)
    return (((grid - center[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1


def blob(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
    return noise > np.quantile(noise, rng.uniform(0.6, 0.98))


SHAPES = {
    "sliver": sliver,
    "diagonal_sheet": diagonal_sheet,
    "few_voxels": few_voxels,
    "cap_at_a_face": cap_at_a_face,
    "touching_every_face": touching_every_face,
    "blob": blob,
}


def crop_labels(task: str, shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Task labels of a crop holding one organ part of ``kind`` (sometimes a second organ beside it)."""
    spec = TASKS[task]
    values = list(spec.organ_values)
    value = values[int(rng.integers(len(values)))]
    label = np.zeros(shape, dtype=np.float32)
    label[SHAPES[kind](shape, rng)] = value
    if len(values) > 1 and rng.random() < 0.3:  # another organ, where the first is not
        other = values[(values.index(value) + 1) % len(values)]
        label[(label == 0) & blob(shape, rng)] = other
    return label


def crop_shape(task: str) -> tuple[int, int, int]:
    return (48, 48, 12) if TASKS[task].region == "chest" else (32, 32, 32)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("engine", ["rules", "geometry"])
def test_thousands_of_crops_give_a_valid_tumor_or_none(task: str, engine: str) -> None:
    region = REGIONS[TASKS[task].region]
    shape = crop_shape(task)
    window = region.window_hu
    intensity = RuleIntensity.for_region(region.name, RULES, window_hu=window) if engine == "rules" else None
    rng = np.random.default_rng(zlib.crc32(f"{task}/{engine}".encode()))
    made = dict.fromkeys(SHAPES, 0)
    draws = 0
    for kind in SHAPES:
        for n in range(40):
            label = crop_labels(task, shape, kind, rng)
            image = rng.uniform(0.3, 0.7, shape).astype(np.float32)
            seed = int(rng.integers(2**31))
            draws += 1
            try:
                result = synthesize_in_crop(
                    image, label, task, rng=np.random.default_rng(seed), spacing_mm=region.spacing_mm,
                    intensity=intensity, window_hu=window,
                )  # fmt: skip
            except Exception as exc:  # the message names the draw, so it can be replayed
                raise AssertionError(f"{task}/{engine}/{kind} draw {n} (seed {seed}) raised {exc!r}") from exc
            if result is None:
                continue
            made[kind] += bool(result.mask.any())
            where = f"{task}/{engine}/{kind} draw {n} (seed {seed})"
            organ_values = np.unique(label[result.mask])
            assert organ_values.size <= 1, where  # one organ's tumor
            if result.mask.any():
                organ = int(organ_values[0])
                assert organ in TASKS[task].organ_values, where
                assert np.all(result.label[result.mask] == organ + 1), where
            assert np.array_equal(result.label[~result.mask], label[~result.mask].astype(result.label.dtype)), where
            changed = result.image != image
            if engine == "geometry":
                assert not changed.any(), where
            else:
                assert np.all(result.image >= 0) and np.all(result.image <= 1), where
                assert np.all(label[changed] > 0), where  # only organ voxels change
            assert np.all(label[result.profile > 0] > 0), where
    assert draws == 240
    # Not vacuous: organs with room get tumors (slivers and caps sometimes do too).
    assert made["touching_every_face"] >= 30 and made["blob"] >= 20, made
