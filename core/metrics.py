"""Segmentation metrics on binary masks with physical spacing: overlap, surface distances, lesions.

Definitions follow MONAI's (``DiceMetric``, ``HausdorffDistanceMetric(percentile=95)``,
``SurfaceDistanceMetric(symmetric=True)``, ``SurfaceDiceMetric`` without sub-voxels):

- surface voxels are the mask minus its erosion by the 6-connected cross;
- HD95 is the larger of the two directed 95th percentiles of surface-to-surface distances;
- the mean surface distance averages the distances of both surfaces together;
- normalized surface Dice is the share of both surfaces within the tolerance of the other.

Empty masks: HD95 and the mean surface distance are ``inf`` when exactly one mask is empty and NaN when
both are; surface Dice is 0 and NaN respectively (as MONAI). Dice has two conventions for an empty
ground truth, reported side by side: excluded (NaN) or 1 when the prediction is empty too, else 0.

All work happens in the bounding box of the two masks plus a margin, so a small lesion in a large
volume costs little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

# Lesion size strata by equivalent-sphere radius (mm); "early" lesions are those up to 10 mm.
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("<=5mm", 0.0, 5.0),
    ("5-10mm", 5.0, 10.0),
    ("10-20mm", 10.0, 20.0),
    (">20mm", 20.0, float("inf")),
)
EARLY_RADIUS_MM = 10.0
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def size_bin(radius_mm: float) -> str:
    for name, low, high in SIZE_BINS:
        if low < radius_mm <= high or (low == 0.0 and radius_mm <= high):
            return name
    return SIZE_BINS[-1][0]


def equivalent_radius_mm(volume_mm3: float) -> float:
    """Radius of the sphere with the given volume."""
    return float((3.0 * volume_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0))


def union_box(*masks: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of the union of 3D masks, grown by ``margin`` voxels, or None when all are empty."""
    union = masks[0]
    for mask in masks[1:]:
        union = union | mask
    plane = np.asarray(union.any(axis=2))  # one pass over the volume; the rest works on projections
    along = (plane.any(axis=1), plane.any(axis=0), union.any(axis=(0, 1)))
    slices = []
    for axis, present in enumerate(along):
        index = np.flatnonzero(present)
        if index.size == 0:
            return None
        slices.append(slice(max(int(index[0]) - margin, 0), min(int(index[-1]) + 1 + margin, union.shape[axis])))
    return tuple(slices)


def dice(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice with both conventions for an empty ground truth.

    Returns:
        (Dice with empty ground truth excluded (NaN), Dice with empty-empty = 1 and empty-vs-any = 0).
    """
    gt_sum, pred_sum = int(gt.sum()), int(pred.sum())
    if gt_sum == 0:
        return float("nan"), 1.0 if pred_sum == 0 else 0.0
    value = 2.0 * int(np.logical_and(pred, gt).sum()) / (gt_sum + pred_sum)
    return value, value


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """The mask minus its erosion by the 6-connected cross (MONAI's and scipy's default)."""
    return mask ^ ndimage.binary_erosion(mask)


@dataclass(frozen=True)
class SurfaceScores:
    hd95_mm: float
    msd_mm: float
    nsd: float


def surface_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    tolerance_mm: float,
    box: tuple[slice, ...] | None = None,
) -> SurfaceScores:
    """HD95, mean surface distance and normalized surface Dice (mm), spacing-aware.

    Args:
        pred, gt: bool masks of the same shape.
        spacing: voxel size per axis in mm.
        tolerance_mm: the surface Dice tolerance.
        box: the region to work in (default: the masks' union box).
    """
    box = box if box is not None else union_box(pred, gt)
    if box is None:
        nan = float("nan")
        return SurfaceScores(nan, nan, nan)
    p, g = pred[box], gt[box]
    if not p.any() or not g.any():
        return SurfaceScores(float("inf"), float("inf"), 0.0)
    scale = np.asarray(spacing, dtype=np.float64)
    p_points = np.argwhere(surface_voxels(p)) * scale
    g_points = np.argwhere(surface_voxels(g)) * scale
    d_pg = cKDTree(g_points).query(p_points, k=1)[0]
    d_gp = cKDTree(p_points).query(g_points, k=1)[0]
    hd95 = max(float(np.percentile(d_pg, 95)), float(np.percentile(d_gp, 95)))
    msd = float(np.concatenate([d_pg, d_gp]).mean())
    nsd = float(((d_pg <= tolerance_mm).sum() + (d_gp <= tolerance_mm).sum()) / (len(d_pg) + len(d_gp)))
    return SurfaceScores(hd95, msd, nsd)


@dataclass(frozen=True)
class Lesion:
    """One connected component, ground truth or predicted."""

    source: str  # "gt" or "pred"
    index: int
    voxels: int
    volume_ml: float
    radius_mm: float
    size_bin: str
    matched: bool
    best_iou: float
    centroid_voxel: tuple[float, float, float]


def match_lesions(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    *,
    min_voxels: int = 1,
    iou_threshold: float = 0.0,
) -> list[Lesion]:
    """Connected components (26-connectivity) of both masks and their one-to-any matching.

    A ground-truth lesion is detected, and a predicted lesion is a true positive, when it overlaps a
    component of the other mask: by any voxel when ``iou_threshold`` is 0, else by IoU at least the
    threshold. Components smaller than ``min_voxels`` are ignored on both sides.
    """
    box = union_box(pred, gt)
    if box is None:
        return []
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    g_lab, n_g = ndimage.label(gt[box], structure=CONNECTIVITY_26)
    p_lab, n_p = ndimage.label(pred[box], structure=CONNECTIVITY_26)
    g_sizes = np.bincount(g_lab.ravel(), minlength=n_g + 1)
    p_sizes = np.bincount(p_lab.ravel(), minlength=n_p + 1)
    both = (g_lab > 0) & (p_lab > 0)
    pairs = g_lab[both].astype(np.int64) * (n_p + 1) + p_lab[both]
    inter = np.bincount(pairs, minlength=(n_g + 1) * (n_p + 1)).reshape(n_g + 1, n_p + 1)
    union = g_sizes[:, None] + p_sizes[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    keep_g = g_sizes >= min_voxels
    keep_p = p_sizes >= min_voxels
    keep_g[0] = keep_p[0] = False
    hit = (iou >= iou_threshold) & (inter > 0) if iou_threshold > 0 else inter > 0
    hit &= keep_g[:, None] & keep_p[None, :]
    offset = np.array([s.start for s in box], dtype=np.float64)
    lesions: list[Lesion] = []
    for source, labels, n, sizes, keep, matched_axis in (
        ("gt", g_lab, n_g, g_sizes, keep_g, 1),
        ("pred", p_lab, n_p, p_sizes, keep_p, 0),
    ):
        if n == 0:
            continue
        centroids = ndimage.center_of_mass(np.ones_like(labels, dtype=np.uint8), labels, index=np.arange(1, n + 1))
        for i in range(1, n + 1):
            if not keep[i]:
                continue
            volume_mm3 = float(sizes[i]) * voxel_mm3
            radius = equivalent_radius_mm(volume_mm3)
            row = iou[i, :] if matched_axis == 1 else iou[:, i]
            matched = bool(hit[i, :].any() if matched_axis == 1 else hit[:, i].any())
            lesions.append(
                Lesion(
                    source=source,
                    index=i,
                    voxels=int(sizes[i]),
                    volume_ml=volume_mm3 / 1000.0,
                    radius_mm=radius,
                    size_bin=size_bin(radius),
                    matched=matched,
                    best_iou=float(row[1:].max()) if row.size > 1 else 0.0,
                    centroid_voxel=tuple(float(c) for c in np.asarray(centroids[i - 1]) + offset),  # type: ignore[arg-type]
                )
            )
    return lesions
