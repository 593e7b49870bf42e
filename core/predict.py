"""Sliding-window prediction with a checkpoint, written back in each input's own geometry.

Each image is oriented to RAS, resampled to the network's spacing, windowed and cropped to the body as in
training (MONAI transforms; or read so preprocessed from the case store); the prediction (Gaussian-blended
sliding window, optional flip test-time augmentation) is brought back with nearest-neighbour
interpolation, so the written label map has exactly the input's affine, shape and orientation. Labels
are written in the region's label space (abdomen 7 classes or chest), whatever the network's task space;
a network that predicts fewer classes (the authors' 2-class COVID-19 baseline) writes only those.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from freetumor_cli.core import PathLike
from freetumor_cli.core.checkpoints import load_checkpoint
from freetumor_cli.core.errors import GeometryError, InputError
from freetumor_cli.core.io import load_header, save_volume
from freetumor_cli.core.label_maps import lookup_table
from freetumor_cli.core.models import ModelConfig
from freetumor_cli.core.outputs import write_text_atomic

if TYPE_CHECKING:
    from freetumor_cli.core.store import CaseData


def channels_to_region(config: ModelConfig) -> np.ndarray:
    """Lookup table from the network's output channels to the region's label space (a network that
    predicts only tumors writes no organ: the authors' COVID-19 baseline gives 0 and 2, lesion)."""
    return lookup_table(config.region_values())


def _preprocess(config: ModelConfig) -> Any:
    from monai import transforms as T

    return T.Compose(config.preprocessing.transforms(("image",)))


def _probabilities(model: Any, config: ModelConfig, x: Any, *, overlap: float, tta: bool) -> Any:
    """Softmax of the Gaussian-blended sliding window over ``x`` ``(1, 1, X, Y, Z)``, with flip TTA."""
    import torch
    from monai.inferers import sliding_window_inference

    def infer(t: Any) -> Any:
        logits = sliding_window_inference(t, config.roi, 4, model, overlap=overlap, mode="gaussian")
        return torch.softmax(torch.as_tensor(logits).float(), 1)

    model.eval()
    with torch.no_grad():
        probs = infer(x)
        if tta:
            for axis in (2, 3, 4):
                probs += torch.flip(infer(torch.flip(x, dims=(axis,))), dims=(axis,))
            probs /= 4
    return probs


def predict_image(
    model: Any,
    config: ModelConfig,
    image_path: PathLike,
    *,
    device: str,
    overlap: float = 0.75,
    tta: bool = False,
) -> np.ndarray:
    """Label map (region space, uint8) for one image file, on the image's own voxel grid.

    The image goes through the network's preprocessing (MONAI), and the prediction back through its
    inverse (nearest neighbour): the body crop is padded back, the resampling and reorientation undone.
    """
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    pre = _preprocess(config)
    try:
        data = pre({"image": str(image_path)})
    except Exception as exc:  # MONAI wraps the reader's error; the file is damaged or not an image
        raise InputError(f"cannot read image {image_path}: {str(exc).splitlines()[-1]}") from exc
    image = data["image"]
    probs = _probabilities(model, config, image.as_tensor()[None].to(device), overlap=overlap, tta=tta)
    pred = probs.argmax(1).cpu().float()  # (1, X, Y, Z): channel-first for the inverse transforms
    data["pred"] = MetaTensor(pred, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
    labels = np.rint(np.asarray(inverted[0])).astype(np.uint8)
    return channels_to_region(config)[labels]


def predict_stored(
    model: Any, config: ModelConfig, case: CaseData, *, device: str, overlap: float = 0.75, tta: bool = False
) -> np.ndarray:
    """Label map (region space, uint8) for a case of the store, resampled onto its source image's grid.

    The stored case is the preprocessed image (the same chain as :func:`predict_image`), and one
    nearest-neighbour resampling from its grid to the source's does what the inverse chain does.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from freetumor_cli.core.store import stored_values

    image, _ = stored_values(case, ...)  # a damaged stored case raises StoreMiss: the caller reads it raw
    x = torch.from_numpy(image)[None, None].to(device)
    pred = _probabilities(model, config, x, overlap=overlap, tta=tta).argmax(1).cpu().float()
    back = SpatialResample(mode="nearest", padding_mode="zeros")(
        MetaTensor(pred, affine=torch.as_tensor(case.affine)),
        dst_affine=torch.as_tensor(case.source_affine),
        spatial_size=case.source_shape,
    )
    labels = np.rint(np.asarray(back[0])).astype(np.uint8)
    return channels_to_region(config)[labels]


def predict_cases(
    checkpoint: PathLike,
    entries: Sequence[Mapping[str, Any] | Path],
    out_dir: PathLike,
    *,
    overlap: float = 0.75,
    tta: bool = False,
    device: str | None = None,
    prepared: PathLike | None = None,
    on_case_done: Callable[[Path], None] | None = None,
) -> tuple[list[Path], ModelConfig, str]:
    """Predict every image with a checkpoint; write ``<out>/<case>.nii.gz`` in each input's geometry.

    Args:
        checkpoint: a checkpoint folder of ``train-seg``.
        entries: image paths, or data-list entries (``image``; ``dataset`` and ``case`` find them in a store).
        out_dir: where the predictions go.
        prepared: a prepared folder whose case store holds the entries at the network's preprocessing:
            they are read from there instead of being decoded and resampled.

    Returns:
        (the files written, the network's configuration, which path the images came by).
    """

    from freetumor_cli.core.cases import case_name
    from freetumor_cli.core.devices import resolve_device
    from freetumor_cli.core.store import StoreMiss, open_store

    device = resolve_device(device or "auto")
    model, config, _ = load_checkpoint(checkpoint, device=device)
    store = open_store(prepared, config.preprocessing) if prepared is not None else None
    out = Path(out_dir)
    written, from_store = [], 0
    for item in entries:
        entry: Mapping[str, Any] = {"image": item} if isinstance(item, Path | str) else item
        path = Path(str(entry["image"]))
        reference = load_header(path, what="image")
        labels = None
        if store is not None and entry.get("dataset") and entry.get("case"):
            try:
                labels = predict_stored(model, config, store.read(entry), device=device, overlap=overlap, tta=tta)
                from_store += 1
            except StoreMiss:
                labels = None
        if labels is None:
            labels = predict_image(model, config, path, device=device, overlap=overlap, tta=tta)
        if labels.shape != reference.shape:
            raise GeometryError(
                f"prediction for {path} came back with shape {labels.shape}, expected {reference.shape}"
            )
        written.append(save_volume(labels, reference, out / f"{case_name(path)}.nii.gz", label=True))
        if on_case_done:
            on_case_done(path)
    source = f"{from_store} of {len(written)} case(s) from the case store {store.folder}" if store else "raw files"
    write_text_atomic(
        out / "prediction.json",
        json.dumps(
            {
                "checkpoint": str(checkpoint),
                "overlap": overlap,
                "tta": tta,
                "task": config.task,
                "classes": list(config.region_class_names),
                "data": source,
            },
            indent=2,
        )
        + "\n",
    )
    return written, config, source
