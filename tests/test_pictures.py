"""The pictures the tool writes: marks sit on what they mark, and plots show what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from freetumor_cli.core.io import Volume


def _panel_pixels(fig: object, ax: object) -> np.ndarray:
    """The RGB pixels of one axes of a drawn figure, as shown (row 0 at the top)."""
    canvas = fig.canvas  # type: ignore[attr-defined]
    rgba = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
    box = ax.get_window_extent()  # type: ignore[attr-defined]
    height = rgba.shape[0]
    top, bottom = int(np.ceil(height - box.y1)), int(np.floor(height - box.y0))
    return rgba[top:bottom, int(np.ceil(box.x0)) : int(np.floor(box.x1))]


def _red(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > 0.6) & (pixels[..., 1] < 0.45) & (pixels[..., 2] < 0.45)


def assert_outlines_enclose_the_darkened_pixels(fig: object, *, top_left: bool = False) -> int:
    """Every "after" panel with an outline: the outline encloses the pixels darker than "before" (and,
    with ``top_left``, they lie in the panel's upper left quarter)."""
    axes = np.asarray(fig.axes).reshape(-1, 6)  # type: ignore[attr-defined]
    checked = 0
    for row in axes:
        for col in range(3):
            before, after = _panel_pixels(fig, row[2 * col]), _panel_pixels(fig, row[2 * col + 1])
            n = min(before.shape[0], after.shape[0]), min(before.shape[1], after.shape[1])
            before, after = before[: n[0], : n[1]], after[: n[0], : n[1]]
            red = _red(after)
            if not red.any():
                continue
            darker = (before.mean(-1) - after.mean(-1) > 0.15) & ~red
            assert darker.sum() > 20, f"{row[2 * col + 1].get_title()}: no darkened pixels"
            inside = ndimage.binary_fill_holes(ndimage.binary_dilation(red, iterations=2))
            share = float((inside & darker).sum() / darker.sum())
            assert share > 0.9, f"{row[2 * col + 1].get_title()}: {share:.0%} of the darkened pixels inside the outline"
            if top_left:
                centroid = np.argwhere(darker).mean(0) / darker.shape
                assert (centroid < 0.5).all(), f"{row[2 * col + 1].get_title()}: the tumor is shown at {centroid}"
            checked += 1
    return checked


@pytest.mark.parametrize(
    "axes_codes", [np.diag([1.0, 1.0, 1.0]), np.diag([-1.0, -1.0, 1.0]), np.array([[0, 0, 1.0], [-1, 0, 0], [0, 1, 0]])]
)
def test_preview_outlines_lie_on_the_darkened_tumor(axes_codes: np.ndarray) -> None:
    """A tumor anterior, superior and on the patient's right, on RAS, LPS and permuted grids: in each panel
    the outline encloses the voxels the tumor darkened (not their mirror image), and these lie at the top
    left, as radiological convention shows that corner of the body (patient's right on the image's left,
    anterior on the left of sagittal slices)."""
    import matplotlib.pyplot as plt

    from freetumor_cli.core.preview import draw_tumor_preview

    shape = (48, 44, 40)
    affine = np.eye(4)
    affine[:3, :3] = axes_codes @ np.diag([2.0, 2.5, 3.0])
    world = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1) @ affine[:3, :3].T
    centre = world.reshape(-1, 3).mean(0)
    extent = world.reshape(-1, 3).max(0) - world.reshape(-1, 3).min(0)
    tumor_world = centre + np.array([0.25, 0.25, 0.28]) * extent  # right, anterior, superior of the middle
    mask = np.linalg.norm(world - tumor_world, axis=-1) < 12.0
    ct = np.full(shape, 90.0, dtype=np.float32)
    ct[(world[..., 2] - centre[2]) < -0.3 * extent[2]] = 20.0  # a darker band low down, for contrast
    before = Volume(ct, affine)
    after = before.like(np.where(mask, ct - 120.0, ct).astype(np.float32))
    voxel = np.argwhere(mask).mean(0).round().astype(int)
    fig = draw_tumor_preview(before=before, after=after, tumor_mask=mask, centers=[voxel], region="abdomen")
    try:
        fig.canvas.draw()
        assert assert_outlines_enclose_the_darkened_pixels(fig, top_left=True) == 3
    finally:
        plt.close(fig)


def _label_file(folder: Path, name: str, array: np.ndarray) -> Path:
    from freetumor_cli.core.io import save_volume

    return save_volume(
        array.astype(np.uint8), Volume(np.zeros(array.shape, np.int16), np.eye(4)), folder / name, label=True
    )


def _bar_pixels(png: Path) -> int:
    """Pixels of the plots' bars (matplotlib's first colour, blue, drawn at 60 % opacity or full)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    return int(((rgb[..., 2] > 0.55) & (rgb[..., 0] < 0.6) & (rgb[..., 2] - rgb[..., 0] > 0.2)).sum())


def test_evaluation_plots_show_what_they_say(tmp_path: Path) -> None:
    """Many false positives in one case (3,375 one-voxel lesions) still give visible bars, and size bins
    without lesions are marked as such rather than drawn as a sensitivity of 0."""
    import matplotlib.pyplot as plt

    from freetumor_cli.core.evaluate import EvaluateConfig, evaluate, sensitivity_figure, write_reports

    gt, pred = np.zeros((40, 40, 40), np.uint8), np.zeros((40, 40, 40), np.uint8)
    gt[2:38, 2:38, 2:38] = 1
    gt[5:9, 5:9, 5:9] = 2  # one lesion of 4 mm equivalent radius: the "<=5mm" bin
    noisy = pred.copy()
    noisy[gt == 1] = 1
    noisy[5:9, 5:9, 5:9] = 2
    noisy[10:40:2, 10:40:2, 10:40:2] = 2  # isolated voxels: 3,375 false-positive lesions
    for folder, array in (("gt", gt), ("pred", noisy)):
        _label_file(tmp_path / folder, "a.nii.gz", array)
        _label_file(tmp_path / folder, "b.nii.gz", gt)  # a case without false positives
    cases, summary, _ = evaluate(tmp_path / "pred", tmp_path / "gt", EvaluateConfig(classes=("liver_tumor",)))
    assert max(r["fp_lesions"] for c in cases for r in c.rows) == 3375
    write_reports(cases, summary, tmp_path / "ev")
    assert _bar_pixels(tmp_path / "ev" / "false_positives_per_case.png") > 2000  # one bin per count: 486
    fig = sensitivity_figure(summary)
    try:
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert texts.count("no lesions") == 3 and "2/2" in texts, texts
        heights = [p.get_height() for p in fig.axes[0].patches]
        assert sum(np.isfinite(heights)) == 1 and np.nanmax(heights) == 1.0, heights
    finally:
        plt.close(fig)
