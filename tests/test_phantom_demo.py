from __future__ import annotations

import numpy as np

from freetumor_cli.core import phantom
from freetumor_cli.core.phantom import make_phantom
from freetumor_cli.core.registry import ORGANS


def test_phantom_anatomy_and_hu() -> None:
    p = make_phantom((80, 72, 48), (4.0, 4.0, 4.0), seed=1, tumors=1, lung_lesions=1)
    ct, lab = p.ct.array, p.labels.array
    assert ct.dtype == np.int16 and lab.dtype == np.uint8
    for name in ("liver", "pancreas", "kidney"):
        organ = lab == ORGANS[name].value
        assert organ.sum() > 50, name
        assert 60 < ct[organ].mean() < 200
        tumor = lab == ORGANS[name].tumor_value
        assert tumor.any(), f"no real {name} tumor"
        assert ct[tumor].mean() < ct[organ].mean() - 20, "real tumors are hypodense"
    assert ct.min() <= -950  # air
    assert (p.lung.array == 1).sum() > 0 and (p.lung.array == 2).sum() > 0
    assert len(p.tumors) == 4


def test_phantom_is_reproducible_and_any_spacing() -> None:
    a = make_phantom((40, 40, 20), (6.0, 6.0, 8.0), seed=2)
    b = make_phantom((40, 40, 20), (6.0, 6.0, 8.0), seed=2)
    c = make_phantom((40, 40, 20), (6.0, 6.0, 8.0), seed=3)
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    assert not np.array_equal(a.ct.array, c.ct.array)
    np.testing.assert_allclose(a.ct.spacing, [6.0, 6.0, 8.0])
    fine = make_phantom((100, 100, 12), (1.0, 1.0, 5.0), seed=2)  # a partial field of view
    assert fine.ct.shape == (100, 100, 12)


# Organ centroids (world x, mm, from the spine's midline; RAS: + is the patient's right) of the shared
# real CT (TotalSegmentator's example, its "total" labels): the side each organ lies on, and about where.
REAL_SIDES_MM = {
    "liver": 69,
    "inferior_vena_cava": 19,
    "kidney_right": 69,
    "spleen": -108,
    "kidney_left": -71,
    "stomach": -36,
    "pancreas": -20,
    "aorta": -11,
}


def _centroids(labels: np.ndarray, affine: np.ndarray, ids: dict[str, int]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in ids.items():
        voxels = np.argwhere(labels == value)
        if len(voxels):
            out[name] = affine[:3, :3] @ voxels.mean(0) + affine[:3, 3]
    return out


def test_phantom_organs_lie_where_a_real_patients_do() -> None:
    """The liver on the patient's right (RAS x > 0), the spleen and stomach on the left, and so on for every
    organ, within a factor of three of a real CT's offsets from the midline; the right kidney is lower."""
    for seed in range(4):
        p = make_phantom((96, 84, 64), (4.0, 4.0, 4.0), seed=seed)
        liver = np.argwhere(np.isin(p.labels.array, (1, 2))).mean(0)
        assert (p.ct.affine[:3, :3] @ liver + p.ct.affine[:3, 3])[0] > 40, "the liver is on the patient's right"
        assert p.totalseg is not None
        found = _centroids(p.totalseg.array, p.ct.affine, dict(phantom.TOTALSEG_IDS))
        for name, real_x in REAL_SIDES_MM.items():
            x = found[name][0]  # the phantom's spine lies at x = 0
            assert np.sign(x) == np.sign(real_x) and 1 / 3 < x / real_x < 3, (seed, name, round(x), real_x)
        assert found["kidney_right"][2] < found["kidney_left"][2], "the right kidney is lower"
        # Its TotalSegmentator map and its freetumor labels describe the same organs.
        for organ, ids in (("liver", (5,)), ("pancreas", (7,)), ("kidney", (2, 3))):
            spec = ORGANS[organ]
            np.testing.assert_array_equal(
                np.isin(p.totalseg.array, ids), np.isin(p.labels.array, (spec.value, spec.tumor_value))
            )


def test_the_real_sides_table_is_the_shared_real_case(totalseg_case) -> None:  # type: ignore[no-untyped-def]
    import nibabel as nib

    image = nib.load(totalseg_case / "totalseg_labels.nii.gz")
    labels = np.asarray(image.dataobj)
    ids = {"liver": 5, "inferior_vena_cava": 63, "kidney_right": 2, "spleen": 1, "kidney_left": 3, "stomach": 6}
    ids |= {"pancreas": 7, "aorta": 52}
    found = _centroids(labels, image.affine, ids)
    spine = _centroids(labels, image.affine, {"L1": 31})["L1"][0]  # vertebra L1 (TotalSegmentator v2 id 31)
    for name, x in REAL_SIDES_MM.items():
        assert abs(found[name][0] - spine - x) < 3, (name, found[name][0] - spine)
