"""The learned engine for ``synthesize``: the generator's intensity map in place of the rule's scalar.

The rule-based engine still decides each tumor's shape, position, edge and texture (its profile
``blur(mask) · texture`` inside the organ); :class:`GeneratorIntensity` gives the change
``sign · profile · map`` with the generator's per-voxel map in place of the rule's scalar ``d``.

The generator sees what it saw in training: the crop training would cut around the tumor, of its own
size (``roi`` of ``generator.json``), on the grid its preprocessing
(:class:`~freetumor_cli.core.preprocess.Preprocessing`: reoriented, resampled to its spacing) puts the
CT on, resampled as that chain resamples, windowed, zeros where the crop leaves the CT as where a
training crop leaves its case. Its map is kept to the organ and blurred as in training
(:func:`~freetumor_cli.core.gan.intensity_map`) and resampled back onto the CT's grid. The result is
clamped to the window as training clamps the windowed crop, so a saturated map takes the organ to the
window's edge and no further.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from freetumor_cli.core import PathLike
from freetumor_cli.core.engines import Box, Scene, TumorGeometry
from freetumor_cli.core.errors import InputError
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.registry import REGIONS, Organ

if TYPE_CHECKING:
    from freetumor_cli.core.checkpoints import GeneratorCard


@functools.lru_cache(maxsize=4)
def cached_generator(path: str, device: str = "cpu") -> Any:
    from freetumor_cli.core.checkpoints import load_generator

    return load_generator(path, device=device)


def network_grid(
    preprocessing: Preprocessing, affine: np.ndarray, shape: Sequence[int]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The grid the preprocessing chain resamples a volume of ``affine`` and ``shape`` onto (reoriented,
    at its spacing): its voxel-to-world matrix and shape, computed by the chain's own transforms (lazily:
    no voxel is touched)."""
    import torch
    from monai.data import MetaTensor

    steps = preprocessing.transforms(("image",), load=False, crop_foreground=False)[:2]  # orientation, spacing
    data: dict[str, Any] = {"image": MetaTensor(torch.zeros(1).expand(1, *shape), affine=torch.as_tensor(affine))}
    for step in steps:
        step.lazy = True
        data = step(data)
    return np.asarray(data["image"].peek_pending_affine(), dtype=np.float64), tuple(
        int(n) for n in data["image"].peek_pending_shape()
    )


def voxel_box(affine: np.ndarray, shape: Sequence[int], world: np.ndarray, margin: int = 1) -> Box:
    """The box of a volume's voxels that holds the world points ``world`` (``(n, 3)``) with ``margin``
    voxels to spare (for interpolation), clipped to the volume."""
    voxels = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    low = np.maximum(np.floor(voxels.min(axis=0)).astype(int) - margin, 0)
    high = np.minimum(np.ceil(voxels.max(axis=0)).astype(int) + margin + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))


def generator_map(
    image_hu: np.ndarray,
    affine: np.ndarray,
    organ: tuple[Box, np.ndarray],
    tumor_box: Box,
    generator: Any,
    card: GeneratorCard,
    channel: int,
) -> tuple[Box, np.ndarray]:
    """The generator's intensity change (HU per unit of profile) around one tumor, on the CT's grid.

    The crop is the one training would cut from the whole CT at the generator's preprocessing: a crop of
    ``roi`` voxels of the grid the chain resamples the CT onto (:func:`network_grid`), centred on the
    tumor, its voxels resampled as the chain resamples them and zero beyond the CT.

    Args:
        image_hu: the CT in HU, shape ``(I, J, K)``.
        affine: its voxel-to-world matrix.
        organ: the organ's bounding box in ``image_hu`` and its voxels there before synthesis (bool).
        tumor_box: the tumor's box in ``image_hu``; the crop is centred on it.
        generator: the generator network (eval mode).
        card: its card (region, spacing, window, crop).
        channel: the output channel of the tumor's organ.

    Returns:
        (a box of ``image_hu`` that holds ``tumor_box``, the map there: float32, 0 where the crop does
        not reach).
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from freetumor_cli.core.gan import intensity_map
    from freetumor_cli.core.seg_data import read_crop

    preprocessing = card.preprocessing
    roi = np.asarray(card.roi, dtype=int)
    grid, grid_shape = network_grid(preprocessing, affine, image_hu.shape)
    center_voxel = np.array([(s.start + s.stop - 1) / 2 for s in tumor_box])
    center = np.linalg.solve(grid[:3, :3], affine[:3, :3] @ center_voxel + affine[:3, 3] - grid[:3, 3])
    origin = np.floor(center + 0.5).astype(int) - roi // 2
    crop_affine = grid.copy()
    crop_affine[:3, 3] = grid[:3, :3] @ origin + grid[:3, 3]
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)]) * (roi - 1)
    crop_box = voxel_box(affine, image_hu.shape, corners @ crop_affine[:3, :3].T + crop_affine[:3, 3])
    box = tuple(slice(min(a.start, t.start), max(a.stop, t.stop)) for a, t in zip(crop_box, tumor_box, strict=True))
    start, size = np.array([s.start for s in box]), [s.stop - s.start for s in box]
    box_affine = affine.copy()
    box_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    organ_box, organ_voxels = organ
    organ_here = read_crop(organ_voxels, start - [s.start for s in organ_box], size)
    # Beyond the CT there is nothing, as beyond a training case: zeros.
    on_grid = read_crop(np.ones(grid_shape, dtype=bool), origin, roi)

    def to_crop(array: np.ndarray, mode: str) -> np.ndarray:
        source = MetaTensor(
            torch.from_numpy(np.asarray(array, dtype=np.float32).copy())[None], affine=torch.as_tensor(box_affine)
        )
        resample = SpatialResample(mode=mode, padding_mode="border", align_corners=False, dtype=np.float64)
        return np.asarray(resample(source, dst_affine=torch.as_tensor(crop_affine), spatial_size=tuple(roi))[0])

    low, high = preprocessing.window_hu
    image_crop = np.where(on_grid, np.clip((to_crop(image_hu[box], "bilinear") - low) / (high - low), 0, 1), 0)
    organ_crop = on_grid & (to_crop(organ_here, "nearest") > 0.5)
    device = next(generator.parameters()).device
    organ_tensor = torch.from_numpy(organ_crop)[None, None].to(device)
    with torch.no_grad():
        out = generator(torch.from_numpy(image_crop.astype(np.float32))[None, None].to(device))
        change = intensity_map(out, [channel], card.region, organ_tensor)[0].cpu()
    back = SpatialResample(mode="bilinear", padding_mode="zeros", align_corners=False, dtype=np.float64)(
        MetaTensor(change, affine=torch.as_tensor(crop_affine)),
        dst_affine=torch.as_tensor(box_affine),
        spatial_size=size,
    )
    return box, np.asarray(back[0], dtype=np.float32) * np.float32(high - low)


def clamp_to_window(image_hu: np.ndarray, change_hu: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
    """The change training makes of ``change_hu``: the windowed voxel plus the change, clamped to the
    window (a voxel already beyond the window's edge in the change's direction stays as it is)."""
    low, high = float(window_hu[0]), float(window_hu[1])
    windowed = np.clip(image_hu.astype(np.float32), low, high)
    return (np.clip(windowed + change_hu, low, high) - windowed).astype(np.float32)


class GeneratorIntensity:
    """The generator as an intensity model: ``sign · profile · map`` on each tumor's box, clamped to the
    window (see the module doc). Raises :class:`InputError` when the generator is for another region than
    the organ's.
    """

    name = "generator"

    def __init__(self, generator_path: PathLike, organ: Organ, *, device: str = "cpu") -> None:
        loaded = cached_generator(str(generator_path), device)
        if loaded.region != organ.region:
            raise InputError(
                f"the generator {generator_path} is for the {loaded.region}; --organ {organ.name} is not",
                hint="use a generator trained for that region",
            )
        self.module, self.card = loaded.module, loaded.card
        self.channel = loaded.channel(organ.name)

    def change(self, tumor: TumorGeometry, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        tumor_box = scene.global_box(tumor.box)
        organ_voxels = scene.organ_mask
        if organ_voxels is None:  # not told where the organ is: the map is not kept to it
            organ_voxels = np.ones([s.stop - s.start for s in scene.bbox], dtype=bool)
        box, hu_map = generator_map(
            scene.image, scene.affine, (scene.bbox, organ_voxels), tumor_box, self.module, self.card, self.channel
        )
        inside = hu_map[tuple(slice(t.start - b.start, t.stop - b.start) for t, b in zip(tumor_box, box, strict=True))]
        sign = float(REGIONS[scene.organ.region].tumor_sign)
        image = scene.image[tumor_box]
        delta = clamp_to_window(
            image, (sign * tumor.profile * inside).astype(np.float32), self.card.preprocessing.window_hu
        )
        full = clamp_to_window(image[tumor.mask], sign * inside[tumor.mask], self.card.preprocessing.window_hu)
        return delta, float(full.mean()) if full.size else 0.0
