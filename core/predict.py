"""Sliding-window prediction with a checkpoint, written back in each input's own geometry.

Each image is oriented to RAS, resampled to the network's spacing and windowed as in training (MONAI
transforms); the prediction (Gaussian-blended sliding window, optional flip test-time augmentation) is
inverted through the same transforms with nearest-neighbour interpolation, so the written label map has
exactly the input's affine, shape and orientation. Labels are written in the region's label space
(abdomen 7 classes or chest), whatever the network's task space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli.core.errors import GeometryError
from freetumor_cli.core.io import load_volume, save_volume, write_text_atomic
from freetumor_cli.core.models import ModelConfig, load_checkpoint
from freetumor_cli.core.registry import task


def task_to_region(task_name: str) -> np.ndarray:
    """Lookup table from the network's task labels to the region's label space."""
    lut = np.zeros(256, dtype=np.uint8)
    for task_value, region_value in task(task_name).task_to_region().items():
        lut[task_value] = region_value
    return lut


def _preprocess(config: ModelConfig) -> Any:
    from monai import transforms as T

    # The whole volume (no foreground crop), so that the prediction inverts onto the input's grid.
    return T.Compose(config.preprocessing().transforms(("image",), crop_foreground=False))


def predict_image(
    model: Any,
    config: ModelConfig,
    image_path: str | os.PathLike[str],
    *,
    device: str,
    overlap: float = 0.75,
    tta: bool = False,
) -> np.ndarray:
    """Label map (region space, uint8) for one image, on the image's own voxel grid."""
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Invertd

    pre = _preprocess(config)
    data = pre({"image": str(image_path)})
    image = data["image"]
    x = image.as_tensor()[None].to(device) if hasattr(image, "as_tensor") else torch.as_tensor(image)[None].to(device)
    model.eval()

    def infer(t: Any) -> Any:
        logits = sliding_window_inference(t, config.roi, 4, model, overlap=overlap, mode="gaussian")
        return torch.softmax(torch.as_tensor(logits).float(), 1)

    with torch.no_grad():
        probs = infer(x)
        if tta:
            for axis in (2, 3, 4):
                probs += torch.flip(infer(torch.flip(x, dims=(axis,))), dims=(axis,))
            probs /= 4
    pred = probs.argmax(1).cpu().float()  # (1, X, Y, Z): channel-first for the inverse transforms
    data["pred"] = MetaTensor(pred, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
    labels = np.rint(np.asarray(inverted[0])).astype(np.uint8)
    return task_to_region(config.task)[labels]


def predict_cases(
    checkpoint: str | os.PathLike[str],
    images: Sequence[Path],
    out_dir: str | os.PathLike[str],
    *,
    overlap: float = 0.75,
    tta: bool = False,
    device: str | None = None,
    on_case_done: Callable[[Path], None] | None = None,
) -> tuple[list[Path], ModelConfig]:
    """Predict every image with a checkpoint; write ``<out>/<case>.nii.gz`` in each input's geometry."""
    import torch

    from freetumor_cli.core.io import case_name

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, config, _ = load_checkpoint(checkpoint, device=device)
    out = Path(out_dir)
    written = []
    for path in images:
        reference = load_volume(path, what="image")
        labels = predict_image(model, config, path, device=device, overlap=overlap, tta=tta)
        if labels.shape != reference.shape:
            raise GeometryError(
                f"prediction for {path} came back with shape {labels.shape}, expected {reference.shape}"
            )
        written.append(save_volume(labels, reference, out / f"{case_name(path)}.nii.gz", label=True))
        if on_case_done:
            on_case_done(path)
    write_text_atomic(
        out / "prediction.json",
        json.dumps({"checkpoint": str(checkpoint), "overlap": overlap, "tta": tta, "task": config.task}, indent=2)
        + "\n",
    )
    return written, config
