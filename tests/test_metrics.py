"""Metrics: hand-computed values on tiny masks, and agreement with MONAI on random masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from freetumor_cli.core.metrics import dice, equivalent_radius_mm, match_lesions, size_bin, surface_scores


def box_mask(shape: tuple[int, int, int], *boxes: tuple[slice, slice, slice]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for b in boxes:
        mask[b] = True
    return mask


def test_dice_hand_computed_and_empty_conventions() -> None:
    gt = box_mask((6, 6, 6), np.s_[0:2, 0:2, 0:2])  # 8 voxels
    pred = box_mask((6, 6, 6), np.s_[1:3, 0:2, 0:2])  # 8 voxels, 4 shared
    assert dice(pred, gt) == (0.5, 0.5)
    empty = np.zeros_like(gt)
    excluded, as_one = dice(empty, empty)
    assert math.isnan(excluded) and as_one == 1.0
    excluded, as_one = dice(pred, empty)
    assert math.isnan(excluded) and as_one == 0.0
    assert dice(empty, gt) == (0.0, 0.0)


def test_surface_scores_hand_computed_with_anisotropic_spacing() -> None:
    # Two single voxels 2 voxels apart along axis 2 at 3 mm spacing: every distance is 6 mm.
    gt = box_mask((3, 3, 5), np.s_[1:2, 1:2, 0:1])
    pred = box_mask((3, 3, 5), np.s_[1:2, 1:2, 2:3])
    s = surface_scores(pred, gt, (0.5, 0.5, 3.0), tolerance_mm=5.0)
    assert s.hd95_mm == pytest.approx(6.0) and s.msd_mm == pytest.approx(6.0) and s.nsd == 0.0
    assert surface_scores(pred, gt, (0.5, 0.5, 3.0), tolerance_mm=6.0).nsd == 1.0
    same = surface_scores(gt, gt, (0.5, 0.5, 3.0), tolerance_mm=0.0)
    assert (same.hd95_mm, same.msd_mm, same.nsd) == (0.0, 0.0, 1.0)


def test_surface_scores_empty_masks() -> None:
    gt = box_mask((4, 4, 4), np.s_[1:3, 1:3, 1:3])
    empty = np.zeros_like(gt)
    one = surface_scores(empty, gt, (1, 1, 1), tolerance_mm=1)
    assert one.hd95_mm == math.inf and one.msd_mm == math.inf and one.nsd == 0.0
    both = surface_scores(empty, empty, (1, 1, 1), tolerance_mm=1)
    assert math.isnan(both.hd95_mm) and math.isnan(both.nsd)


def test_lesions_one_voxel_touching_and_false_positive() -> None:
    shape = (10, 10, 10)
    # Two ground-truth lesions touching diagonally (one 26-connected component), a one-voxel lesion,
    # and a prediction that finds the first, misses the one-voxel lesion and adds a false positive.
    gt = box_mask(shape, np.s_[0:2, 0:2, 0:2], np.s_[2:3, 2:3, 2:3], np.s_[8:9, 8:9, 8:9])
    pred = box_mask(shape, np.s_[0:1, 0:1, 0:1], np.s_[5:7, 0:1, 9:10])
    lesions = match_lesions(pred, gt, (1.0, 1.0, 1.0))
    gt_l = sorted((x for x in lesions if x.source == "gt"), key=lambda x: -x.voxels)
    pred_l = sorted((x for x in lesions if x.source == "pred"), key=lambda x: -x.voxels)
    assert [x.voxels for x in gt_l] == [9, 1]  # touching boxes merged by 26-connectivity
    assert [x.matched for x in gt_l] == [True, False]
    assert [x.voxels for x in pred_l] == [2, 1]
    assert [x.matched for x in pred_l] == [False, True]
    assert gt_l[1].radius_mm == pytest.approx(equivalent_radius_mm(1.0))
    # With an IoU threshold the 1-of-9 overlap no longer counts.
    strict = match_lesions(pred, gt, (1.0, 1.0, 1.0), iou_threshold=0.2)
    assert not any(x.matched for x in strict)
    # A minimum size drops the one-voxel components on both sides.
    big = match_lesions(pred, gt, (1.0, 1.0, 1.0), min_voxels=2)
    assert sorted(x.voxels for x in big) == [2, 9]


def test_size_bins_and_physical_radius() -> None:
    assert size_bin(5.0) == "<=5mm" and size_bin(5.01) == "5-10mm" and size_bin(10.0) == "5-10mm"
    assert size_bin(20.0) == "10-20mm" and size_bin(25.0) == ">20mm"
    # 1 x 1 x 5 mm voxels: 100 voxels = 500 mm^3.
    gt = box_mask((10, 10, 10), np.s_[0:10, 0:10, 0:1])
    (lesion,) = match_lesions(np.zeros_like(gt), gt, (1.0, 1.0, 5.0))
    assert lesion.volume_ml == pytest.approx(0.5)
    assert lesion.radius_mm == pytest.approx((3 * 500 / (4 * math.pi)) ** (1 / 3))


def random_blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return field > np.quantile(field, 0.8)


def test_agreement_with_monai_on_random_anisotropic_masks() -> None:
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(0)
    spacing = (0.7, 1.2, 3.0)
    tolerance = 2.0
    for _ in range(4):
        gt = random_blobs(rng, (40, 36, 20))
        pred = random_blobs(rng, (40, 36, 20)) | (gt & (rng.random(gt.shape) < 0.7))
        ours_dice, _ = dice(pred, gt)
        ours = surface_scores(pred, gt, spacing, tolerance_mm=tolerance)

        def onehot(mask: np.ndarray) -> object:
            return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

        y_pred, y = onehot(pred), onehot(gt)
        theirs_dice = monai_metrics.compute_dice(y_pred, y, include_background=False).item()
        hd95 = monai_metrics.compute_hausdorff_distance(
            y_pred, y, include_background=False, percentile=95, spacing=spacing
        ).item()
        msd = monai_metrics.compute_average_surface_distance(
            y_pred, y, include_background=False, symmetric=True, spacing=spacing
        ).item()
        nsd = monai_metrics.compute_surface_dice(
            y_pred, y, [tolerance], include_background=False, spacing=spacing
        ).item()
        assert ours_dice == pytest.approx(theirs_dice, abs=1e-4)
        assert ours.hd95_mm == pytest.approx(hd95, abs=1e-4)
        assert ours.msd_mm == pytest.approx(msd, abs=1e-4)
        assert ours.nsd == pytest.approx(nsd, abs=1e-4)


def test_csv_writer_refuses_a_row_key_without_a_column() -> None:
    from freetumor_cli.core.evaluate import CASE_COLUMNS, csv_text

    assert csv_text([{"case": "a", "dice": 0.5}], CASE_COLUMNS).splitlines()[1].startswith("a,,,,0.5,")
    with pytest.raises(ValueError, match="'dice_typo'"):
        csv_text([{"case": "a", "dice_typo": 0.5}], CASE_COLUMNS)


def test_columns_summary_and_tables_come_from_the_metric_specs() -> None:
    from freetumor_cli.core.evaluate import (
        CASE_COLUMNS,
        LESION_COLUMNS,
        METRICS,
        CaseScores,
        EvaluateConfig,
        summarize,
        summary_markdown,
        summary_table,
    )

    # The CSV layout others read (core/fair.py, users' scripts) stays as it is.
    assert CASE_COLUMNS == (
        "case", "class", "value", "prediction_missing", "dice", "dice_empty_as_one", "nsd", "hd95_mm", "msd_mm",
        "gt_volume_ml", "pred_volume_ml", "volume_error_ml", "gt_lesions", "pred_lesions", "tp_lesions",
        "fn_lesions", "fp_lesions",
    )  # fmt: skip
    assert LESION_COLUMNS == (
        "case", "class", "source", "index", "voxels", "volume_ml", "radius_mm", "size_bin", "matched", "best_iou",
        "centroid_voxel",
    )  # fmt: skip
    case_metrics = [m for m in METRICS if m.scope == "case"]
    assert CASE_COLUMNS[4:] == tuple(m.key for m in case_metrics)
    row = {key: 1.0 for key in CASE_COLUMNS} | {"case": "a", "class": "tumor", "value": 2, "gt_lesions": 1}
    lesion = {"case": "a", "class": "tumor", "source": "gt", "matched": True, "radius_mm": 3.0, "size_bin": "<=5mm"}
    summary = summarize([CaseScores("a", [row], [lesion])], {2: "tumor"}, EvaluateConfig(label_space="task"))
    entry = summary["classes"]["tumor"]
    for m in METRICS:
        if m.summarize is not None:
            assert m.key in (entry if m.scope == "case" else entry["lesions"]), m.key
    markdown = summary_markdown(summary)
    headings, rows = summary_table(summary, where="markdown")
    assert headings == ["class", *(m.heading for m in METRICS if m.heading)]
    assert "| " + " | ".join(headings) + " |" in markdown and "| " + " | ".join(rows[0]) + " |" in markdown
    assert rows[0][:2] == ["tumor", "1.000"]  # the Dice mean
    headings, rows = summary_table(summary, where="cli")
    assert headings == ["class", *(m.cli for m in METRICS if m.cli)]
    assert len(rows[0]) == len(headings)
