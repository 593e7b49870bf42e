"""Preview images: axial, coronal and sagittal slices through tumors, before and after, as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from freetumor_cli.core import PathLike
from freetumor_cli.core.io import Volume
from freetumor_cli.core.outputs import atomic_path
from freetumor_cli.core.registry import REGIONS

MAX_PREVIEW_TUMORS = 6


def to_ras(volume: Volume, array: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient an array on ``volume``'s grid to the closest RAS axes, for display.

    Returns:
        (reoriented array, its voxel spacing, the orientation matrix used by nibabel).
    """
    ornt = nib.orientations.io_orientation(volume.affine)
    data = volume.array if array is None else array
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = volume.spacing
    return nib.orientations.apply_orientation(data, ornt), spacing, ornt


def index_to_ras(index: Sequence[int], shape: Sequence[int], ornt: np.ndarray) -> tuple[int, int, int]:
    """Map a voxel index of the original array into the reoriented one."""
    out = [0, 0, 0]
    for axis, (target, flip) in enumerate(ornt.astype(int)):
        out[target] = shape[axis] - 1 - index[axis] if flip < 0 else index[axis]
    return tuple(int(v) for v in out)  # type: ignore[return-value]


def displayed_slice(ras: np.ndarray, index: int, axis: int) -> np.ndarray:
    """Slice ``index`` across ``axis`` of a RAS array, as shown: row 0 at the top, column 0 on the left.

    Radiological convention: superior (axial: anterior) at the top, and the patient's right on the
    image's left for axial and coronal slices, anterior on the left for sagittal ones.
    """
    return np.take(ras, index, axis=axis).T[::-1, ::-1]


def draw_tumor_preview(
    *,
    before: Volume,
    after: Volume,
    tumor_mask: np.ndarray,
    centers: Sequence[Sequence[int]],
    region: str,
    title: str = "",
) -> Any:
    """The figure of :func:`save_tumor_preview` (a matplotlib ``Figure``; the caller closes it).

    Each row holds one tumor's axial, coronal and sagittal slices, before and after; the tumor is
    outlined on the "after" panels. The outline is drawn in the image's own pixel coordinates (row 0 at
    the top, as the image is shown), so it lies on the voxels it outlines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = REGIONS[region].window_hu
    ras_before, spacing, ornt = to_ras(before)
    ras_after, _, _ = to_ras(after)
    ras_mask, _, _ = to_ras(before, tumor_mask.astype(np.uint8))
    rows = list(centers)[:MAX_PREVIEW_TUMORS] or [tuple(s // 2 for s in before.shape)]
    fig, axes = plt.subplots(len(rows), 6, figsize=(15, 2.7 * len(rows) + 0.5), squeeze=False)
    views = (("axial", 2), ("coronal", 1), ("sagittal", 0))
    for row, center in enumerate(rows):
        c = index_to_ras(center, before.shape, ornt)
        for col, (name, axis) in enumerate(views):
            for k, (label, data) in enumerate((("before", ras_before), ("after", ras_after))):
                ax = axes[row, 2 * col + k]
                image = displayed_slice(data, c[axis], axis).astype(np.float32)
                mask = displayed_slice(ras_mask, c[axis], axis)
                shown = [a for a in range(3) if a != axis]
                aspect = spacing[shown[1]] / spacing[shown[0]]
                ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], origin="upper", aspect=aspect)
                if k == 1 and mask.any():
                    # No origin here: contour's origin="upper" would put row 0 at the bottom of these axes.
                    ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
                ax.set_title(f"tumor {row + 1} {name} {label}", fontsize=8)
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_tumor_preview(
    *,
    before: Volume,
    after: Volume,
    tumor_mask: np.ndarray,
    centers: Sequence[Sequence[int]],
    region: str,
    path: PathLike,
    title: str = "",
) -> Path:
    """Write a PNG with one row per tumor: axial, coronal, sagittal, before and after, tumor outlined.

    Slices are shown in radiological convention (:func:`displayed_slice`): the patient's right on the
    image's left.
    """
    import matplotlib.pyplot as plt

    fig = draw_tumor_preview(
        before=before, after=after, tumor_mask=tumor_mask, centers=centers, region=region, title=title
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=PREVIEW_DPI, format="png")
    plt.close(fig)
    return path


PREVIEW_DPI = 90
