"""A procedural abdominal CT phantom: the project's test and demo data.

Body outline, subcutaneous and visceral fat, abdominal wall and back muscles, spine, aorta and vena
cava, liver with hepatic vessels, spleen, stomach, pancreas, both kidneys and the lung bases, in
Hounsfield units with noise, at any shape and voxel size. Organ shapes are lobulated by a smooth random
field, so each seed gives a different patient.

Optional "real" tumors are drawn by a recipe of their own (lobulated unions of spheres, homogeneous
hypodense core, enhancing rim, sharp edge), unlike the synthesizer's textured, elastically deformed
ellipsoids, so a model trained on synthetic tumors is tested on something it has not seen.

World coordinates are RAS millimetres (x to the patient's right, y anterior, z superior) with the
volume's centre at the origin: the liver, the inferior vena cava and the pancreas head lie at x > 0, the
spleen, the stomach, the aorta and the pancreas tail at x < 0, as in a real CT (its liver centroid at
about +66 mm), and the right kidney a little lower than the left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from freetumor_cli.core.io import Volume
from freetumor_cli.core.registry import ORGANS


@dataclass(frozen=True)
class RealTumor:
    """A phantom tumor (ground truth for tests and the demo)."""

    organ: str
    center_voxel: tuple[int, int, int]
    radius_mm: float
    hu_change: float
    voxels: int


@dataclass(frozen=True)
class Phantom:
    """A phantom CT with its labels.

    Attributes:
        ct: int16 HU.
        labels: uint8 in the abdomen space (liver, pancreas, kidney and their tumors).
        lung: uint8 in the chest space (1 lung, 2 lesion).
        tumors: the "real" tumors drawn into it.
        totalseg: uint8, its organs as TotalSegmentator v2's "total" task labels them
            (:data:`TOTALSEG_IDS`; tumors are part of their organ there).
    """

    ct: Volume
    labels: Volume
    lung: Volume
    tumors: list[RealTumor] = field(default_factory=list)
    totalseg: Volume | None = None


# The TotalSegmentator v2 "total" class ids of the phantom's organs.
TOTALSEG_IDS: Mapping[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "lung_lower_lobe_left": 11,
    "lung_lower_lobe_right": 14,
    "aorta": 52,
    "inferior_vena_cava": 63,
}


class _Canvas:
    """The phantom under construction: HU and label arrays plus mm coordinates per axis."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(self.shape, self.spacing, strict=True)]
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        self.lung = np.zeros(self.shape, dtype=np.uint8)
        self.totalseg = np.zeros(self.shape, dtype=np.uint8)

    def box(
        self, center: Sequence[float] | np.ndarray, half: Sequence[float] | np.ndarray
    ) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
        """Voxel slices and mm coordinates of the box ``center ± half`` clipped to the volume."""
        slices, coords = [], []
        for axis, (c, h) in enumerate(zip(center, half, strict=True)):
            a = self.axes[axis]
            lo = int(np.searchsorted(a, c - h))
            hi = int(np.searchsorted(a, c + h, side="right"))
            if hi <= lo:
                return None
            slices.append(slice(lo, hi))
            coords.append(a[lo:hi])
        return tuple(slices), coords


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, points: int = 5) -> np.ndarray:
    """A smooth random field in about [-1, 1] over ``shape`` (cubic upsampling of a coarse grid)."""
    coarse = rng.uniform(-1, 1, size=(points, points, points))
    factors = [max(n, 1) / points for n in shape]
    field_ = ndimage.zoom(coarse, factors, order=3, mode="nearest", grid_mode=True)
    return field_[: shape[0], : shape[1], : shape[2]].astype(np.float32)


def _ellipsoid(
    canvas: _Canvas,
    center: Sequence[float] | np.ndarray,
    semi: Sequence[float] | np.ndarray,
    rng: np.random.Generator,
    *,
    lobulation: float = 0.15,
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """A lobulated ellipsoid: its box and bool mask there."""
    found = canvas.box(center, [s * (1 + lobulation) for s in semi])
    if found is None:
        return None
    slices, (x, y, z) = found
    value = ((x[:, None, None] - center[0]) / semi[0]) ** 2
    value = value + ((y[None, :, None] - center[1]) / semi[1]) ** 2
    value = value + ((z[None, None, :] - center[2]) / semi[2]) ** 2
    if lobulation:
        value = value - lobulation * _smooth_field(value.shape, rng)
    return slices, value <= 1.0


def _capsule_chain(
    canvas: _Canvas, points: np.ndarray, radii: np.ndarray
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """A tube through ``points`` (mm) with radius ``radii`` at each point: its box and mask."""
    lo = (points - radii[:, None]).min(axis=0)
    hi = (points + radii[:, None]).max(axis=0)
    found = canvas.box((lo + hi) / 2, (hi - lo) / 2)
    if found is None:
        return None
    slices, (x, y, z) = found
    mask = np.zeros(tuple(len(a) for a in (x, y, z)), dtype=bool)
    for (px, py, pz), r in zip(points, radii, strict=True):
        d2 = (x[:, None, None] - px) ** 2 + (y[None, :, None] - py) ** 2 + (z[None, None, :] - pz) ** 2
        mask |= d2 <= r * r
    return slices, mask


def _paint(
    canvas: _Canvas,
    found: tuple[tuple[slice, ...], np.ndarray] | None,
    hu: float,
    label: int | None = None,
    *,
    lung: int | None = None,
    totalseg: str | None = None,
) -> np.ndarray | None:
    if found is None:
        return None
    slices, mask = found
    canvas.hu[slices][mask] = hu
    if label is not None:
        canvas.labels[slices][mask] = label
    if lung is not None:
        canvas.lung[slices][mask] = lung
    if totalseg is not None:
        canvas.totalseg[slices][mask] = TOTALSEG_IDS[totalseg]
    full = np.zeros(canvas.shape, dtype=bool)
    full[slices] = mask
    return full


def _body(canvas: _Canvas, rng: np.random.Generator) -> None:
    x, y, z = canvas.axes
    a, b = 160.0 * rng.uniform(0.9, 1.08), 115.0 * rng.uniform(0.9, 1.08)
    yc = -10.0
    angle = np.arctan2((y[None, :] - yc) / b, x[:, None] / a)
    wobble = 1 + 0.03 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.02 * np.cos(5 * angle)
    r = np.sqrt((x[:, None] / a) ** 2 + ((y[None, :] - yc) / b) ** 2) / wobble
    fat_mm = rng.uniform(12, 25)
    scale = min(a, b)
    skin = r <= 1.0
    under_fat = r <= 1.0 - fat_mm / scale
    under_wall = r <= 1.0 - (fat_mm + 12.0) / scale
    layer = np.full(r.shape, -1000.0, dtype=np.float32)
    layer[skin] = -100.0
    layer[under_fat] = 45.0  # abdominal wall muscle
    layer[under_wall] = -90.0  # visceral fat, filled by organs and bowel below
    canvas.hu[:] = layer[:, :, None]
    # Bowel loops: soft-tissue blobs in the visceral fat.
    inside = np.argwhere(under_wall)
    for _ in range(int(rng.integers(10, 18))):
        ix, iy = inside[int(rng.integers(len(inside)))]
        center = (x[ix], y[iy], rng.uniform(z[0], z[-1]) if len(z) > 1 else z[0])
        semi = rng.uniform(12, 28, size=3)
        found = _ellipsoid(canvas, center, semi, rng, lobulation=0.3)
        if found is not None:
            slices, mask = found
            mask &= under_wall[slices[0], slices[1]][:, :, None]
            canvas.hu[slices][mask] = rng.uniform(10, 40)
    # Back muscles and spine (constant along z).
    for side in (-1, 1):
        _paint(canvas, _ellipsoid(canvas, (side * 38, -85, 0), (26, 20, 10_000), rng, lobulation=0), 50.0)
    _paint(canvas, _ellipsoid(canvas, (0, -62, 0), (20, 17, 10_000), rng, lobulation=0), 700.0)
    _paint(canvas, _ellipsoid(canvas, (0, -62, 0), (16, 13, 10_000), rng, lobulation=0), 230.0)
    _paint(canvas, _ellipsoid(canvas, (0, -92, 0), (18, 10, 10_000), rng, lobulation=0), 650.0)
    _paint(canvas, _ellipsoid(canvas, (0, -88, 0), (7, 6, 10_000), rng, lobulation=0), 15.0)


def _organs(canvas: _Canvas, rng: np.random.Generator) -> dict[str, np.ndarray]:
    jitter = lambda s: rng.uniform(-s, s)  # noqa: E731
    # RAS: x > 0 is the patient's right (liver, vena cava), x < 0 the left (spleen, stomach, aorta).
    # Lung bases first: the liver dome and spleen push up into them.
    for side in (-1, 1):
        _paint(
            canvas,
            _ellipsoid(
                canvas, (side * 85 + jitter(5), -15 + jitter(5), 150 + jitter(8)), (70, 80, 100), rng, lobulation=0.05
            ),
            -860.0,
            lung=1,
            totalseg="lung_lower_lobe_right" if side > 0 else "lung_lower_lobe_left",
        )
    organs: dict[str, np.ndarray] = {}
    liver = _ellipsoid(
        canvas,
        (70 + jitter(8), 5 + jitter(6), 40 + jitter(8)),
        (85 * rng.uniform(0.9, 1.1), 78, 72),
        rng,
        lobulation=0.2,
    )
    organs["liver"] = _paint(canvas, liver, 110.0 + jitter(10), ORGANS["liver"].value, lung=0, totalseg="liver")  # type: ignore[assignment]
    _paint(
        canvas,
        _ellipsoid(canvas, (-88 + jitter(5), -35, 45 + jitter(8)), (38, 45, 55), rng),
        120.0,
        0,
        lung=0,
        totalseg="spleen",
    )
    _paint(
        canvas,
        _ellipsoid(canvas, (-40, 45, 55 + jitter(8)), (45, 30, 35), rng, lobulation=0.25),
        25.0,
        0,
        lung=0,
        totalseg="stomach",
    )
    kidneys = []
    for side in (-1, 1):
        # The right kidney sits a little lower than the left (the liver above it).
        center = (side * (72 + jitter(5)), -48 + jitter(4), -25 - 5 * side + jitter(10))
        kidney = _ellipsoid(canvas, center, (30, 26, 55 * rng.uniform(0.9, 1.1)), rng, lobulation=0.1)
        name = "kidney_right" if side > 0 else "kidney_left"
        full = _paint(canvas, kidney, 170.0 + jitter(10), ORGANS["kidney"].value, totalseg=name)
        if full is not None:
            kidneys.append(full)
            sinus = _ellipsoid(canvas, (center[0] - side * 14, center[1] + 6, center[2]), (8, 9, 22), rng, lobulation=0)
            if sinus is not None:
                sl, m = sinus
                m &= full[sl]
                canvas.hu[sl][m] = -40.0
                canvas.labels[sl][m] = 0
                canvas.totalseg[sl][m] = 0
    if kidneys:
        organs["kidney"] = np.logical_or.reduce(kidneys)
    t = np.linspace(0, 1, 24)[:, None]
    # Head on the right by the duodenum, tail on the left at the spleen's hilum.
    head, body, tail = np.array([28, -5, 0.0]), np.array([-28, 5, 10.0]), np.array([-80, -25, 22.0])
    head += rng.uniform(-6, 6, 3)
    tail += rng.uniform(-6, 6, 3)
    path = (1 - t) ** 2 * head + 2 * (1 - t) * t * body + t**2 * tail
    radii = np.linspace(17, 9, len(path)) * rng.uniform(0.85, 1.1)
    pancreas = _capsule_chain(canvas, path, radii)
    organs["pancreas"] = _paint(canvas, pancreas, 95.0 + jitter(8), ORGANS["pancreas"].value, totalseg="pancreas")  # type: ignore[assignment]
    # Great vessels (constant along z): the aorta left of the midline, the vena cava right; hepatic vessels.
    aorta = _ellipsoid(canvas, (-15, -38, 0), (11, 11, 10_000), rng, lobulation=0)
    _paint(canvas, aorta, 175.0, 0, lung=0, totalseg="aorta")
    vena_cava = _ellipsoid(canvas, (22, -32, 0), (12, 10, 10_000), rng, lobulation=0)
    _paint(canvas, vena_cava, 140.0, 0, lung=0, totalseg="inferior_vena_cava")
    if organs.get("liver") is not None:
        for _ in range(4):
            start = np.array([25.0, -20.0, 20.0]) + rng.uniform(-5, 5, 3)
            end = np.array([70 + rng.uniform(20, 50), rng.uniform(-40, 50), rng.uniform(20, 90)])
            steps = np.linspace(0, 1, 20)[:, None]
            vessel = _capsule_chain(canvas, start + steps * (end - start), np.linspace(5, 2, 20))
            if vessel is not None:
                sl, m = vessel
                m &= organs["liver"][sl]
                canvas.hu[sl][m] = 165.0
    return {k: v for k, v in organs.items() if v is not None}


def _real_tumor(
    canvas: _Canvas, organ: str, organ_mask: np.ndarray, rng: np.random.Generator, radius_range: tuple[float, float]
) -> RealTumor | None:
    spec = ORGANS[organ]
    healthy = organ_mask & (canvas.labels == spec.value)
    candidates = np.argwhere(healthy[::2, ::2, ::2]) * 2
    if len(candidates) == 0:
        return None
    center_idx = candidates[int(rng.integers(len(candidates)))]
    center = np.array([canvas.axes[a][center_idx[a]] for a in range(3)])
    radius = float(rng.uniform(*radius_range))
    mask_total = np.zeros(canvas.shape, dtype=bool)
    for k in range(int(rng.integers(1, 4))):  # a lobulated union of spheres
        offset = rng.normal(0, radius * 0.35, 3) if k else np.zeros(3)
        r = radius * (rng.uniform(0.6, 0.9) if k else 1.0)
        found = _ellipsoid(canvas, center + offset, (r, r, r), rng, lobulation=0.0)
        if found is not None:
            sl, m = found
            mask_total[sl] |= m
    mask_total &= organ_mask
    if not mask_total.any():
        return None
    background = float(np.median(canvas.hu[healthy]))
    change = -float(rng.uniform(35, 70))
    core = np.float32(background + change)
    canvas.hu[mask_total] = core
    # An enhancing rim on most of them.
    if rng.random() < 0.7:
        rim = mask_total & ~ndimage.binary_erosion(mask_total, iterations=1)
        canvas.hu[rim] = core + np.float32(rng.uniform(10, 25))
    canvas.labels[mask_total] = spec.tumor_value
    voxel = (int(center_idx[0]), int(center_idx[1]), int(center_idx[2]))
    return RealTumor(organ, voxel, round(radius, 2), round(change, 1), int(mask_total.sum()))


def _lung_lesion(canvas: _Canvas, rng: np.random.Generator) -> RealTumor | None:
    lung = canvas.lung == 1
    candidates = np.argwhere(lung[::2, ::2, ::2]) * 2
    if len(candidates) == 0:
        return None
    center_idx = candidates[int(rng.integers(len(candidates)))]
    center = [canvas.axes[a][center_idx[a]] for a in range(3)]
    radius = float(rng.uniform(8, 25))
    found = _ellipsoid(canvas, center, (radius, radius * 0.8, radius), rng, lobulation=0.4)
    if found is None:
        return None
    sl, m = found
    m &= lung[sl]
    change = float(rng.uniform(250, 450))
    canvas.hu[sl][m] += np.float32(change)
    canvas.lung[sl][m] = 2
    return RealTumor("lung", tuple(int(v) for v in center_idx), round(radius, 2), round(change, 1), int(m.sum()))  # type: ignore[arg-type]


def make_phantom(
    shape: Sequence[int] = (160, 160, 96),
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    *,
    seed: int = 0,
    tumors: int | Mapping[str, int] = 0,
    tumor_radius_mm: tuple[float, float] = (5.0, 20.0),
    lung_lesions: int = 0,
    noise_hu: float = 12.0,
) -> Phantom:
    """Make a phantom abdominal CT.

    Args:
        shape: voxels per axis (RAS order).
        spacing: voxel size in mm per axis.
        seed: the phantom's seed; the same seed gives the same phantom.
        tumors: "real" tumors per abdominal organ (an int for each of liver, pancreas and kidney, or a
            mapping organ -> count).
        tumor_radius_mm: range of the real tumors' radii.
        lung_lesions: COVID-like lesions in the lung bases (chest labels).
        noise_hu: standard deviation of the image noise.

    Returns:
        The phantom; its affine is RAS with the volume's centre at the world origin.
    """
    rng = np.random.default_rng(seed)
    canvas = _Canvas(shape, spacing)
    _body(canvas, rng)
    organs = _organs(canvas, rng)
    counts = dict.fromkeys(("liver", "pancreas", "kidney"), tumors) if isinstance(tumors, int) else dict(tumors)
    real: list[RealTumor] = []
    for organ, n in counts.items():
        if organ not in organs:
            continue
        for _ in range(int(n)):
            tumor = _real_tumor(canvas, organ, organs[organ], rng, tumor_radius_mm)
            if tumor is not None:
                real.append(tumor)
    for _ in range(lung_lesions):
        lesion = _lung_lesion(canvas, rng)
        if lesion is not None:
            real.append(lesion)
    # Mild partial-volume blur, then noise.
    sigma = [max(0.0, 0.6 / s * 1.0) for s in canvas.spacing]
    hu = ndimage.gaussian_filter(canvas.hu, sigma=sigma, truncate=2.0) if max(sigma) > 0.2 else canvas.hu
    hu += rng.normal(0.0, noise_hu, size=canvas.shape).astype(np.float32)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    affine = np.diag([*canvas.spacing, 1.0])
    affine[:3, 3] = [canvas.axes[a][0] for a in range(3)]
    ct_volume = Volume(ct, affine)
    return Phantom(
        ct_volume, ct_volume.like(canvas.labels), ct_volume.like(canvas.lung), real, ct_volume.like(canvas.totalseg)
    )
