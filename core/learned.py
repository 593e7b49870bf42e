"""The learned engine for ``synthesize``: the generator's intensity map in place of the rule's scalar.

The rule-based engine still decides each tumor's shape, position, edge and texture (its profile
``blur(mask) · texture`` inside the organ); :class:`GeneratorIntensity` gives the change
``sign · profile · map`` with the generator's per-voxel map in place of the rule's scalar ``d``. The map is computed on the tumor's box of the CT, preprocessed by the same
MONAI chain the generator was trained on (:class:`~freetumor_cli.core.preprocess.Preprocessing`:
reoriented, resampled to its spacing, windowed), and inverted through that chain onto the CT's grid.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from freetumor_cli.core.engines import Scene, TumorGeometry
from freetumor_cli.core.errors import InputError
from freetumor_cli.core.preprocess import Preprocessing
from freetumor_cli.core.registry import REGIONS, Organ


@functools.lru_cache(maxsize=4)
def cached_generator(path: str, device: str = "cpu") -> Any:
    from freetumor_cli.core.checkpoints import load_generator

    return load_generator(path, device=device)


def generator_preprocessing(meta: dict[str, Any]) -> Preprocessing:
    """The preprocessing a generator was trained with, from its metadata (``generator.json``)."""
    return Preprocessing.for_region(
        meta["generator"]["region"], spacing_mm=meta["spacing_mm"], window_hu=meta["window_hu"]
    )


def generator_map(
    box_hu: np.ndarray, box_affine: np.ndarray, generator: Any, meta: dict[str, Any], channel: int
) -> np.ndarray:
    """The generator's intensity change (HU per unit of profile) on a box of the CT, on the box's grid.

    Args:
        box_hu: the box's voxels in HU, shape ``(I, J, K)``.
        box_affine: the box's voxel-to-world matrix.
        generator: the generator network (eval mode).
        meta: its metadata (region, spacing, window).
        channel: the output channel of the tumor's organ.

    Returns:
        float32, shape ``(I, J, K)``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd

    from freetumor_cli.core.gan import intensity_map

    preprocessing = generator_preprocessing(meta)
    chain = Compose(preprocessing.transforms(("image",), load=False, crop_foreground=False))
    image = MetaTensor(
        torch.from_numpy(np.asarray(box_hu, dtype=np.float32).copy())[None], affine=torch.as_tensor(box_affine)
    )
    data = chain({"image": image})
    x = data["image"]
    shape = tuple(int(n) for n in x.shape[1:])
    # The network halves the grid three times: pad to a multiple of 8 by repeating the edge.
    pads = [max(8, -(-n // 8) * 8) - n for n in shape]
    padded = torch.nn.functional.pad(x.as_tensor()[None], [p for n in reversed(pads) for p in (0, n)], mode="replicate")
    with torch.no_grad():
        out = generator(padded.to(next(generator.parameters(), padded).device))
        change = intensity_map(out, [channel], meta["generator"]["region"])[0].cpu()
    change = change[:, : shape[0], : shape[1], : shape[2]]
    data["map"] = MetaTensor(change, meta=dict(x.meta), applied_operations=list(x.applied_operations))
    back = Invertd(keys="map", transform=chain, orig_keys="image", nearest_interp=False)(data)["map"]
    low, high = preprocessing.window_hu
    return np.asarray(back[0], dtype=np.float32) * np.float32(high - low)


class GeneratorIntensity:
    """The generator as an intensity model: ``sign · profile · map`` on each tumor's box.

    The map is the generator's output on the box of the CT (in HU), preprocessed as it was trained
    and inverted back onto the CT's grid; the profile is the rule engine's. Raises
    :class:`InputError` when the generator is for another region than the organ's.
    """

    name = "generator"

    def __init__(self, generator_path: str | os.PathLike[str], organ: Organ, *, device: str = "cpu") -> None:
        loaded = cached_generator(str(generator_path), device)
        if loaded.region != organ.region:
            raise InputError(
                f"the generator {generator_path} is for the {loaded.region}; --organ {organ.name} is not",
                hint="use a generator trained for that region",
            )
        self.module, self.meta = loaded.module, loaded.meta
        self.channel = loaded.channel(organ.name)

    def change(self, tumor: TumorGeometry, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        box = scene.global_box(tumor.box)
        box_affine = scene.affine.copy()
        box_affine[:3, 3] = scene.affine[:3, :3] @ np.array([s.start for s in box]) + scene.affine[:3, 3]
        change = generator_map(scene.image[box], box_affine, self.module, self.meta, self.channel)
        sign = float(REGIONS[scene.organ.region].tumor_sign)
        nominal = sign * float(change[tumor.mask].mean()) if tumor.mask.any() else 0.0
        return (sign * tumor.profile * change).astype(np.float32), nominal
