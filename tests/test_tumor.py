"""The rule-based engine, step by step, on tiny arrays and the small phantom."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from freetumor_cli.core.errors import LabelError, OrganTooSmallError
from freetumor_cli.core.phantom import Phantom
from freetumor_cli.core.registry import ORGANS
from freetumor_cli.core.synthesis_config import SynthesisConfig
from freetumor_cli.core.tumor import (
    TumorDraw,
    _tumor_voxels,
    blur_mask,
    body_axis,
    deformed_ellipsoid,
    draw_displacement_controls,
    plan_size_classes,
    prepare_organ,
    sample_tumor_center,
    synthesize_in_organ,
    tumor_shape,
    tumor_texture,
)

CONFIG = SynthesisConfig()
LIVER = ORGANS["liver"]


def ball(shape: tuple[int, int, int], spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return x**2 + y**2 + z**2 <= radius_mm**2


def test_texture_statistics_match_the_recipe() -> None:
    rng = np.random.default_rng(0)
    texture = tumor_texture((60, 60, 60), (1.0, 1.0, 1.0), rng, CONFIG)
    assert texture.dtype == np.float32 and texture.shape == (60, 60, 60)
    assert texture.min() >= 0 and texture.max() <= 1
    above = texture[texture > CONFIG.texture_threshold]
    # Rescaled on the texture grid then linearly resampled: the mean above threshold stays near u0.
    assert 0.45 <= above.mean() <= 0.6
    assert texture.std() > 0.02, "texture must not be flat"


def test_texture_has_no_size_limit_and_any_spacing() -> None:
    rng = np.random.default_rng(1)
    wide = tumor_texture((700, 8, 6), (0.7, 0.7, 5.0), rng, CONFIG)  # wider than the reference's 420 voxels
    assert wide.shape == (700, 8, 6) and np.isfinite(wide).all()


def test_shape_radii_are_physical_on_anisotropic_voxels() -> None:
    spacing = (0.7, 0.7, 5.0)
    radii = (10.0, 14.0, 20.0)
    half = 25.0
    axes = [(np.arange(-int(half / s), int(half / s) + 1)) * s for s in spacing]
    mask = tumor_shape(axes, radii, half_extent_mm=half, elastic_sigma_mm=0.0, rng=np.random.default_rng(0))
    for axis, radius in enumerate(radii):
        present = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        extent_mm = (present.max() - present.min()) * spacing[axis]
        assert abs(extent_mm - 2 * radius) <= 2 * spacing[axis] + 1e-6


def test_elastic_deformation_changes_the_shape_but_keeps_its_size() -> None:
    axes = [np.arange(-30, 31) * 1.0] * 3
    plain = tumor_shape(axes, (12, 12, 12), half_extent_mm=30, elastic_sigma_mm=0.0, rng=np.random.default_rng(0))
    warped = tumor_shape(axes, (12, 12, 12), half_extent_mm=30, elastic_sigma_mm=4.0, rng=np.random.default_rng(0))
    assert (plain != warped).sum() > 100
    assert 0.5 < warped.sum() / plain.sum() < 2.0


def test_deformed_ellipsoid_matches_its_formula() -> None:
    """The matrix-product evaluation equals sum_c ((x_c + u_c) / r_c)^2 <= 1 with the displacement field."""
    axes = [np.arange(-20, 17) * 0.8, np.arange(-15, 19) * 1.1, np.arange(-9, 8) * 2.5]
    radii = (11.0, 9.0, 13.0)
    controls = draw_displacement_controls(3.0, np.random.default_rng(4))
    grid = np.meshgrid(*axes, indexing="ij")
    # Quadratic Lagrange basis through the control points at -18, 0, +18 mm, clamped beyond them.
    t = [np.clip(g / 18.0, -1, 1) for g in grid]
    basis = [[s * (s - 1) / 2, 1 - s * s, s * (s + 1) / 2] for s in t]
    u = [
        sum(
            basis[0][a] * basis[1][b] * basis[2][c] * controls[k, a, b, c]
            for a in range(3)
            for b in range(3)
            for c in range(3)
        )
        for k in range(3)
    ]
    value = sum(((g + d) / r) ** 2 for g, d, r in zip(grid, u, radii, strict=True))
    mask = deformed_ellipsoid(axes, radii, controls, 18.0)
    assert mask.shape == value.shape and mask.any()
    # Float32 rounding may only flip voxels sitting on the surface.
    assert np.array_equal(mask, value <= 1.0) or np.all(np.abs(value[mask != (value <= 1.0)] - 1) < 1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_blur_mask_equals_the_gaussian_filter(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(3, 45, size=3))
    mask = np.zeros(shape, dtype=bool)
    lo = rng.integers(0, np.array(shape) - 1)
    hi = lo + rng.integers(1, np.array(shape) - lo + 1)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = rng.random(tuple(hi - lo)) < 0.6
    mask[tuple(lo)] = True
    spacing = rng.uniform(0.5, 3.0, size=3)
    sigma = float(rng.uniform(0.5, 4.0))
    blurred, box = blur_mask(mask, sigma, spacing, gain=-80.0)
    reference = ndimage.gaussian_filter(mask.astype(np.float64), sigma / spacing, mode="constant", truncate=2.5)
    full = np.zeros(shape)
    full[box] = blurred
    assert blurred.dtype == np.float32
    np.testing.assert_allclose(full, -80.0 * reference, atol=1e-4)
    # The box is the mask's bounding box grown by the kernel's radius, within the array.
    radius = (2.5 * sigma / spacing + 0.5).astype(int)
    nonzero = np.argwhere(mask)
    assert [b.start for b in box] == list(np.maximum(nonzero.min(axis=0) - radius, 0))
    assert [b.stop for b in box] == list(np.minimum(nonzero.max(axis=0) + 1 + radius, shape))
    with pytest.raises(ValueError, match="empty"):
        blur_mask(np.zeros((4, 4, 4), dtype=bool), 1.0, (1.0, 1.0, 1.0))


def test_tumor_is_never_cut_by_its_first_box() -> None:
    """A box that is too small grows until the tumor touches none of its inner faces."""
    organ = ball((70, 70, 70), (1.0, 1.0, 1.0), 34.0)
    geometry = prepare_organ(organ, LIVER, spacing=(1.0, 1.0, 1.0), affine=np.eye(4), config=CONFIG)
    controls = draw_displacement_controls(2.0, np.random.default_rng(3))
    draw = TumorDraw(np.array([30, 36, 40]), np.array([12.0, 9.0, 15.0]), controls, 21.0, 2.0, 2.0, 10.0)
    found = _tumor_voxels(draw, geometry, np.array([28, 34, 38]), np.array([33, 39, 43]))
    assert found is not None
    tight, corner = found
    reach = np.ceil(draw.reach_mm()).astype(int)
    lo = np.maximum(draw.center - reach, 0)
    hi = np.minimum(draw.center + reach + 1, geometry.mask.shape)
    axes = [np.arange(a, b) - c for a, b, c in zip(lo, hi, draw.center, strict=True)]
    whole = deformed_ellipsoid(axes, draw.radii_mm, controls, 21.0) & geometry.mask[tuple(map(slice, lo, hi))]
    expected = np.argwhere(whole) + lo
    assert list(corner) == list(expected.min(axis=0))
    assert tight.shape == tuple(expected.max(axis=0) - expected.min(axis=0) + 1)
    assert tight.sum() == whole.sum()


def test_texture_can_multiply_in_place() -> None:
    target = np.random.default_rng(0).random((31, 17, 12), dtype=np.float32)
    texture = tumor_texture(target.shape, (0.8, 1.2, 3.0), np.random.default_rng(7), CONFIG)
    product = target.copy()
    returned = tumor_texture(target.shape, (0.8, 1.2, 3.0), np.random.default_rng(7), CONFIG, multiply=product)
    assert returned is product
    np.testing.assert_allclose(product, target * texture, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        tumor_texture((5, 5, 5), (1.0, 1.0, 1.0), np.random.default_rng(7), CONFIG, multiply=target)


def test_prepare_organ_depth_and_empty_mask() -> None:
    organ = ball((40, 40, 40), (1.5, 1.5, 1.5), 20.0)
    geometry = prepare_organ(organ, LIVER, spacing=(1.5, 1.5, 1.5), affine=np.diag([1.5, 1.5, 1.5, 1]), config=CONFIG)
    assert 16 <= geometry.max_depth_mm <= 23
    assert geometry.fits(24, 0.5) and not geometry.fits(48, 0.5)
    with pytest.raises(LabelError):
        prepare_organ(np.zeros((5, 5, 5), bool), LIVER, spacing=(1, 1, 1), affine=np.eye(4), config=CONFIG)


def test_body_axis_follows_world_z() -> None:
    affine = np.zeros((4, 4))
    affine[0, 2] = affine[1, 0] = 1.0
    affine[2, 1] = 3.0
    affine[3, 3] = 1
    assert body_axis(affine) == 1


def test_centers_always_inside_the_organ() -> None:
    organ = ball((50, 40, 30), (1.0, 1.5, 2.0), 22.0)
    organ[25:, :, :] = False  # a half ball: part of the organ is thin
    geometry = prepare_organ(organ, LIVER, spacing=(1.0, 1.5, 2.0), affine=np.diag([1.0, 1.5, 2.0, 1]), config=CONFIG)
    rng = np.random.default_rng(0)
    for radius in (6, 12, 24, 48):
        for _ in range(50):
            center, depth = sample_tumor_center(geometry, radius, rng, min_depth_fraction=0.5)
            assert geometry.mask[tuple(center)]
            assert depth >= 0


def test_same_seed_same_tumor_different_seed_different(small_phantom: Phantom) -> None:
    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        result = synthesize_in_organ(
            small_phantom.ct.array,
            small_phantom.labels.array == LIVER.value,
            LIVER,
            spacing=small_phantom.ct.spacing,
            affine=small_phantom.ct.affine,
            rng=np.random.default_rng(seed),
            size="medium",
            count=2,
        )
        return result.image, result.tumor_mask

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("organ_name", ["liver", "pancreas", "kidney"])
def test_changes_stay_inside_the_target_organ(small_phantom: Phantom, organ_name: str) -> None:
    organ = ORGANS[organ_name]
    organ_mask = small_phantom.labels.array == organ.value
    result = synthesize_in_organ(
        small_phantom.ct.array,
        organ_mask,
        organ,
        spacing=small_phantom.ct.spacing,
        affine=small_phantom.ct.affine,
        rng=np.random.default_rng(0),
        size="small",
        count=3,
    )
    box_mask = organ_mask[result.bbox]
    before = small_phantom.ct.array[result.bbox].astype(np.float32)
    changed = result.image != before
    assert changed.any()
    assert not (changed & ~box_mask).any(), "the image changed outside the organ"
    assert not (result.tumor_mask & ~box_mask).any(), "the tumor left the organ"
    assert (result.image[result.tumor_mask] < before[result.tumor_mask]).mean() > 0.9  # darker
    assert len(result.tumors) == 3
    for tumor in result.tumors:
        assert organ_mask[tumor.center_voxel]
        assert tumor.mean_hu_change < 0


def test_lung_lesions_are_brighter(small_phantom: Phantom) -> None:
    lung = ORGANS["lung"]
    result = synthesize_in_organ(
        small_phantom.ct.array,
        small_phantom.lung.array == 1,
        lung,
        spacing=small_phantom.ct.spacing,
        affine=small_phantom.ct.affine,
        rng=np.random.default_rng(0),
        size="small",
    )
    assert result.tumors[0].mean_hu_change > 50


def test_too_small_organ_names_volume_and_largest_fitting_size() -> None:
    organ = ball((30, 30, 30), (1.5, 1.5, 1.5), 9.0)
    with pytest.raises(OrganTooSmallError, match=r"ml.*too small for a large tumor.*largest size that fits is small"):
        synthesize_in_organ(
            np.zeros(organ.shape, np.int16), organ, LIVER, spacing=(1.5,) * 3, affine=np.eye(4),
            rng=np.random.default_rng(0), size="large",
        )  # fmt: skip
    with pytest.raises(OrganTooSmallError, match="--radius-mm up to"):
        synthesize_in_organ(
            np.zeros(organ.shape, np.int16), organ, LIVER, spacing=(1.5,) * 3, affine=np.eye(4),
            rng=np.random.default_rng(0), radius_mm=30,
        )  # fmt: skip


def test_mix_falls_back_to_sizes_that_fit_and_says_so() -> None:
    organ = ball((30, 30, 30), (1.5, 1.5, 1.5), 12.0)
    geometry = prepare_organ(organ, LIVER, spacing=(1.5,) * 3, affine=np.eye(4), config=CONFIG)
    classes = plan_size_classes("mix", 20, geometry, CONFIG, np.random.default_rng(0))
    assert set(classes) <= {"tiny", "small"} and len(classes) == 20
    assert any("do not fit" in n for n in geometry.notes)


def test_auto_count_uses_the_class_range() -> None:
    organ = ball((60, 60, 60), (1.5, 1.5, 1.5), 40.0)
    geometry = prepare_organ(organ, LIVER, spacing=(1.5,) * 3, affine=np.eye(4), config=CONFIG)
    counts = {len(plan_size_classes("medium", None, geometry, CONFIG, np.random.default_rng(s))) for s in range(40)}
    assert counts <= set(range(2, 6)) and len(counts) >= 3


def test_exact_radius_gives_equal_radii() -> None:
    organ = ball((50, 50, 50), (1.5, 1.5, 1.5), 35.0)
    result = synthesize_in_organ(
        np.zeros(organ.shape, np.int16), organ, LIVER, spacing=(1.5,) * 3, affine=np.eye(4),
        rng=np.random.default_rng(0), radius_mm=10.0,
    )  # fmt: skip
    assert result.tumors[0].radii_mm == (10.0, 10.0, 10.0)
    assert result.tumors[0].size_class == "custom"


def test_placement_resamples_until_enough_of_the_tumor_survives() -> None:
    # A thin slab organ: most centers leave little of a tumor inside; the engine keeps trying.
    organ = np.zeros((60, 60, 20), bool)
    organ[5:55, 5:55, 8:12] = True
    result = synthesize_in_organ(
        np.zeros(organ.shape, np.int16), organ, LIVER, spacing=(1.0, 1.0, 1.0), affine=np.eye(4),
        rng=np.random.default_rng(0), radius_mm=3.0,
    )  # fmt: skip
    assert result.tumors[0].voxels > 0 and result.tumor_mask.any()


def test_same_physical_size_at_any_spacing() -> None:
    """0.7 x 0.7 x 5 mm voxels and 1.5 mm voxels give tumors of the same volume in ml (on average)."""

    def mean_volume(spacing: tuple[float, float, float]) -> float:
        shape = tuple(round(120 / s) for s in spacing)
        organ = ball(shape, spacing, 55.0)  # type: ignore[arg-type]
        volumes = []
        for seed in range(12):
            result = synthesize_in_organ(
                np.zeros(shape, np.int16), organ, LIVER, spacing=spacing, affine=np.diag([*spacing, 1]),
                rng=np.random.default_rng(seed), size="medium",
            )  # fmt: skip
            volumes.append(result.tumors[0].volume_ml)
        return float(np.mean(volumes))

    iso, aniso = mean_volume((1.5, 1.5, 1.5)), mean_volume((0.7, 0.7, 5.0))
    assert abs(iso - aniso) / iso < 0.15, (iso, aniso)


@pytest.mark.parametrize("axis", range(3))
def test_blur_mask_repeats_the_mask_beyond_open_faces(axis: int) -> None:
    """At the field of view's edge the organ goes on unseen: the blur repeats the edge (scipy "nearest")."""
    rng = np.random.default_rng(axis)
    mask = rng.random((20, 18, 16)) < 0.5
    mask[tuple(slice(None) if a != axis else slice(0, 1) for a in range(3))] = True  # touches both faces
    mask[tuple(slice(None) if a != axis else slice(-1, None) for a in range(3))] = True
    spacing = (0.8, 1.2, 2.0)
    open_faces = [(False, False)] * 3
    open_faces[axis] = (True, True)
    blurred, box = blur_mask(mask, 2.0, spacing, open_faces=open_faces)
    modes = ["constant"] * 3
    modes[axis] = "nearest"
    reference = ndimage.gaussian_filter(mask.astype(np.float64), [2.0 / s for s in spacing], mode=modes, truncate=2.5)
    full = np.zeros(mask.shape)
    full[box] = blurred
    np.testing.assert_allclose(full, reference, atol=1e-5)
    closed, _ = blur_mask(mask, 2.0, spacing)
    assert not np.allclose(closed, blurred, atol=1e-3), "open faces must change the edge"


def test_the_chest_follows_the_originals_lesion_sizes_and_textures() -> None:
    from collections import Counter

    from freetumor_cli.core.errors import ConfigError

    lung = ORGANS["lung"]
    organ = ball((120, 120, 120), (1.5, 1.5, 1.5), 80.0)
    geometry = prepare_organ(organ, lung, spacing=(1.5, 1.5, 1.5), affine=np.diag([1.5, 1.5, 1.5, 1]), config=CONFIG)
    rng = np.random.default_rng(0)
    drawn = Counter(plan_size_classes("mix", 1, geometry, CONFIG, rng)[0] for _ in range(3000))
    assert set(drawn) == {"tiny", "small", "medium"}  # a large lesion fits, but the chest takes none
    for size, share in (("tiny", 0.35), ("small", 0.35), ("medium", 0.30)):
        assert abs(drawn[size] / 3000 - share) < 0.03, drawn
    with pytest.raises(ConfigError, match="come in sizes tiny, small, medium, not large"):
        plan_size_classes("large", 1, geometry, CONFIG, rng)
    textures = {CONFIG.texture_for("chest", rng).texture_sigma_a_mm for _ in range(200)}
    pairs = {
        (c.texture_sigma_a_mm, c.texture_sigma_b_mm) for c in (CONFIG.texture_for("chest", rng) for _ in range(400))
    }
    assert textures == {4.5, 9.0, 13.5, 18.0, 22.5} and len(pairs) == 10
    assert CONFIG.texture_for("abdomen", rng) is CONFIG  # the abdomen keeps its one texture


def test_online_synthesis_goes_beside_real_lesions_in_the_chest_only() -> None:
    import torch

    from freetumor_cli.core.transforms import RandTumorSynthd

    organ = ball((40, 40, 40), (3.0, 3.0, 3.0), 50.0)
    label = organ.astype(np.float32)
    label[18:22, 18:22, 18:22] = 2  # a real tumor or lesion
    image = np.full(label.shape, 0.3, dtype=np.float32)
    for task, expected in (("covid", True), ("liver", False)):
        transform = RandTumorSynthd(
            ["image", "label"], task, spacing_mm=(3.0, 3.0, 3.0), window_hu=(-1000.0, 500.0), size="small"
        )
        transform.set_random_state(1)
        out = transform({"image": torch.from_numpy(image[None].copy()), "label": torch.from_numpy(label[None].copy())})
        assert bool(out["synth_mask"].any()) is expected, task
