"""The learned engine for ``synthesize``: the generator's intensity map in place of the rule's scalar.

The rule-based engine still decides each tumor's shape, position, edge and texture (its patch is
``sign · blur(mask) · texture · d`` inside the organ); here the scalar ``d`` is replaced by the
generator's per-voxel map, computed on the tumor's box reoriented to RAS, resampled to the generator's
spacing and windowed as in training, then brought back to the CT's grid.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import numpy as np
from scipy import ndimage

from freetumor_cli.core.errors import InputError
from freetumor_cli.core.io import Volume
from freetumor_cli.core.registry import Organ
from freetumor_cli.core.tumor import SynthesisResult


@functools.lru_cache(maxsize=4)
def cached_generator(path: str) -> tuple[Any, dict[str, Any]]:
    from freetumor_cli.core.train_synth import load_generator

    return load_generator(path)


def _resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    factors = [t / s for t, s in zip(shape, array.shape, strict=True)]
    out = ndimage.zoom(array, factors, order=1, mode="nearest", grid_mode=True)
    # zoom rounds each axis; trim or pad by one voxel where it lands off.
    out = out[tuple(slice(0, n) for n in shape)]
    pads = [(0, n - m) for n, m in zip(shape, out.shape, strict=True)]
    return np.pad(out, pads, mode="edge") if any(p for _, p in pads) else out


def generator_map(
    region_hu: np.ndarray,
    spacing: np.ndarray,
    affine: np.ndarray,
    generator: Any,
    meta: dict[str, Any],
    organ: Organ,
) -> np.ndarray:
    """The generator's intensity change (HU per unit of profile) on a box of the CT, same shape."""
    import nibabel as nib
    import torch

    from freetumor_cli.core.gan import intensity_map

    low, high = meta["window_hu"]
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(region_hu, ornt)
    ras_spacing = np.empty(3)
    ras_spacing[ornt[:, 0].astype(int)] = spacing
    target = np.asarray(meta["spacing_mm"], dtype=np.float64)
    shape = tuple(max(8, round(float(n * s / t))) for n, s, t in zip(ras.shape, ras_spacing, target, strict=True))
    windowed = np.clip((ras.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    resampled = _resize(windowed, shape)
    padded_shape = tuple(-(-n // 8) * 8 for n in shape)
    padded = np.pad(resampled, [(0, p - n) for n, p in zip(shape, padded_shape, strict=True)], mode="edge")
    with torch.no_grad():
        out = generator(torch.from_numpy(padded)[None, None])
        change = intensity_map(out, [organ.generator_channel], meta["generator"]["region"])[0, 0].numpy()
    change = _resize(change[tuple(slice(0, n) for n in shape)], ras.shape)
    to_original = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    back = nib.orientations.apply_orientation(change, to_original)
    return back.astype(np.float32) * np.float32(high - low)


def apply_generator(result: SynthesisResult, image: Volume, organ: Organ, generator_path: str) -> SynthesisResult:
    """Replace each rule-based patch's scalar change by the generator's map (same shapes and masks)."""
    generator, meta = cached_generator(str(generator_path))
    region = meta["generator"]["region"]
    if (region == "chest") != (organ.region == "chest"):
        raise InputError(
            f"the generator {generator_path} is for the {region}; --organ {organ.name} is not",
            hint="use a generator trained for that region",
        )
    offset = np.array([s.start for s in result.bbox])
    patches = []
    tumors = []
    for (box, delta), record in zip(result.patches, result.tumors, strict=True):
        profile = np.abs(delta / np.float32(record.intensity_change_hu))
        lo = offset + np.array([s.start for s in box])
        hi = offset + np.array([s.stop for s in box])
        global_box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        hu = np.asarray(image.array[global_box], dtype=np.float32)
        change = generator_map(hu, image.spacing, image.affine, generator, meta, organ)
        new_delta = (organ.tumor_sign * profile * change).astype(np.float32)
        patches.append((box, new_delta))
        mask = result.tumor_mask[box]
        tumors.append(replace(record, intensity_change_hu=round(float(change[mask].mean()) * organ.tumor_sign, 2) if mask.any() else 0.0,
                              mean_hu_change=round(float(new_delta[mask].mean()), 2) if mask.any() else 0.0))  # fmt: skip
    return replace(result, patches=patches, tumors=tumors)
