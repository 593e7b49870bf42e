from __future__ import annotations

import numpy as np

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
