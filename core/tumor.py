"""Where synthetic tumors go and what they look like: their position, shape, edge and texture in the organ.

The intensity change a tumor makes is an intensity model's (:mod:`freetumor_cli.core.engines`); this module
places the tumors and hands each model their geometry.

The recipe is SyntheticTumors' (Hu et al., CVPR 2023) as FreeTumor uses it, with its constants given
in millimetres so every voxel size yields the same physical tumors, and with these fixes:

- placement re-samples instead of falling back to voxel (0, 0, 0), prefers centers at least half a
  radius deep inside the organ, and clips the tumor to the TARGET organ only;
- texture is made for the tumor's own box (no 2 GB pre-computed volume, no start-up cost, no size
  limit), normalised independently of the box size;
- all work happens in the tumor's bounding box, in float32;
- every random draw comes from one ``numpy.random.Generator``: the same seed gives the same tumor.

Array functions here take and return plain numpy arrays; geometry (spacing in mm per array axis) is
passed explicitly. The file-level API is :mod:`freetumor_cli.core.synthesize`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from freetumor_cli.core.engines import (
    IntensityModel,
    RuleIntensity,
    Scene,
    TumorGeometry,
    apply_intensity,
    compose_changes,
)
from freetumor_cli.core.errors import ConfigError, LabelError, OrganTooSmallError
from freetumor_cli.core.registry import SIZE_CLASSES, Organ
from freetumor_cli.core.synthesis_config import SizeClass, SynthesisConfig

Floats = Sequence[float] | np.ndarray  # per-axis values in mm: a tuple or an array


@dataclass
class TumorRecord:
    """What was inserted: one synthetic tumor."""

    organ: str
    size_class: str
    center_voxel: tuple[int, int, int]
    radii_mm: tuple[float, float, float]
    elastic_sigma_mm: float
    edge_sigma_mm: float
    intensity_change_hu: float
    depth_mm: float
    voxels: int
    volume_ml: float = 0.0
    kept_fraction: float = 1.0
    mean_hu_change: float = 0.0
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class OrganGeometry:
    """An organ prepared once per volume for any number of tumors.

    Attributes:
        mask: the organ's voxels inside ``bbox``, bool.
        bbox: slices of the organ's bounding box in the volume.
        spacing: voxel size in mm per array axis.
        depth_mm: coarse map of the distance (mm) from organ voxels to the organ's surface.
        coarse_step: the stride of ``depth_mm`` along each axis, in voxels.
        coarse_mask: ``mask`` sampled every ``coarse_step`` voxels.
        slab: bool mask over ``depth_mm``: cells in the organ's middle slab along the body axis.
        at_volume_edge: per axis, whether ``bbox`` reaches the volume's first and last slice: there the
            organ may go on beyond the field of view.
    """

    organ: Organ
    mask: np.ndarray
    bbox: tuple[slice, slice, slice]
    spacing: np.ndarray
    depth_mm: np.ndarray
    coarse_step: np.ndarray
    coarse_mask: np.ndarray
    slab: np.ndarray
    voxel_volume_ml: float
    at_volume_edge: tuple[tuple[bool, bool], ...] = ((False, False),) * 3
    notes: list[str] = field(default_factory=list)

    @property
    def volume_ml(self) -> float:
        return self.organ_voxels * self.voxel_volume_ml

    @functools.cached_property
    def organ_voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def max_depth_mm(self) -> float:
        return float(self.depth_mm.max()) if self.depth_mm.size else 0.0

    def fits(self, radius_mm: float, min_depth_fraction: float) -> bool:
        return self.max_depth_mm >= min_depth_fraction * radius_mm


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Slices of the smallest box holding every true voxel of a 3D mask, or None when it is empty.

    One pass over the volume, along its slowest axis (whole contiguous planes OR-ed together, in C or
    Fortran order alike), then small projections of the plane it leaves.
    """
    outer = int(np.argmax(np.abs(mask.strides))) if mask.size else 0
    plane = np.asarray(mask.any(axis=outer))
    inner = [a for a in range(3) if a != outer]  # the plane's axes, in order
    along: list[np.ndarray] = [np.zeros(0, bool)] * 3
    along[inner[0]], along[inner[1]] = np.asarray(plane.any(axis=1)), np.asarray(plane.any(axis=0))
    along[outer] = np.asarray(mask.any(axis=tuple(inner))) if plane.any() else np.zeros(mask.shape[outer], bool)
    slices = []
    for present in along:
        index = np.flatnonzero(present)
        if index.size == 0:
            return None
        slices.append(slice(int(index[0]), int(index[-1]) + 1))
    return slices[0], slices[1], slices[2]


def body_axis(affine: np.ndarray) -> int:
    """The array axis closest to the world's superior-inferior (z) axis."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))


def prepare_organ(
    organ_mask: np.ndarray,
    organ: Organ,
    *,
    spacing: Floats,
    affine: np.ndarray,
    config: SynthesisConfig,
) -> OrganGeometry:
    """Crop an organ mask to its bounding box and compute its coarse depth map.

    Args:
        organ_mask: bool mask of the target organ over the whole volume, shape ``(I, J, K)``.
        organ: the organ's registry entry.
        spacing: voxel size in mm per array axis.
        affine: the volume's voxel-to-world matrix (for the body axis).
        config: engine constants.

    Raises:
        LabelError: the mask is empty.
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    bbox = bounding_box(organ_mask)
    if bbox is None:
        raise LabelError(f"no {organ.name} voxels in the labels", hint="check --organ and --labels")
    mask = organ_mask[bbox].copy(order="K")  # keeps the memory order: a Fortran-ordered box is not transposed
    step = np.maximum(1, np.floor(config.placement_grid_mm / spacing_arr)).astype(int)
    coarse = mask[:: step[0], :: step[1], :: step[2]]
    if not coarse.any():
        # A sliver thinner than the grid's step (an organ's surface cut obliquely by a crop's face) can
        # fall between its samples: then every voxel is a cell, so the grid always holds the organ.
        step = np.ones(3, dtype=int)
        coarse = mask
    # Pad so the bounding box's faces count as surface (the organ may be cut by the field of view).
    padded = np.pad(coarse, 1)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing_arr * step)[1:-1, 1:-1, 1:-1]
    depth = depth.astype(np.float32)
    axis = body_axis(affine)
    along = np.nonzero(coarse.any(axis=tuple(a for a in range(3) if a != axis)))[0]
    slab = np.zeros_like(coarse)
    lo, hi = config.center_slab
    first, last = along.min(), along.max()
    start = int(np.floor(first + lo * (last - first)))
    stop = int(np.ceil(first + hi * (last - first))) + 1
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    slab[tuple(index)] = coarse[tuple(index)]
    voxel_ml = float(np.prod(spacing_arr)) / 1000.0
    edges = tuple((b.start == 0, b.stop == n) for b, n in zip(bbox, organ_mask.shape, strict=True))
    return OrganGeometry(organ, mask, bbox, spacing_arr, depth, step, coarse, slab, voxel_ml, edges)


def plan_size_classes(
    size: str,
    count: int | None,
    geometry: OrganGeometry,
    config: SynthesisConfig,
    rng: np.random.Generator,
) -> list[str]:
    """Choose the size class of each tumor of one call.

    ``size`` is a class name or ``"mix"``. With ``mix`` each tumor's class is drawn uniformly among
    the classes the organ can hold; classes that do not fit are dropped with a note. A fixed class
    that does not fit raises :class:`OrganTooSmallError`. ``count=None`` draws the count from the
    class's range (with ``mix``, one class is drawn for the call, as SyntheticTumors does).
    """
    allowed = geometry.organ.size_classes
    mixed = [n for n in allowed if not config.mix_sizes or n in config.mix_sizes]  # what mix may draw
    fitting = [n for n in mixed if geometry.fits(config.size_class(n).radius_mm, config.min_depth_fraction)]
    if size != "mix":
        if size not in allowed:
            raise ConfigError(
                f"{geometry.organ.tumor_name}s come in sizes {', '.join(allowed)}, not {size}",
                hint="choose one of those sizes, or mix",
            )
        if not geometry.fits(config.size_class(size).radius_mm, config.min_depth_fraction):
            raise too_small_error(geometry, size, config.size_class(size).radius_mm, config, fitting)
        n = count if count is not None else _draw_count(config.size_class(size), rng)
        return [size] * n
    if not fitting:
        raise too_small_error(geometry, "tiny", config.tiny.radius_mm, config, fitting)
    dropped = [n for n in mixed if n not in fitting]
    if dropped:
        geometry.notes.append(
            f"mix: {', '.join(dropped)} tumors do not fit the {geometry.organ.name} "
            f"({geometry.volume_ml:.1f} ml); using {', '.join(fitting)}"
        )
    weights = geometry.organ.size_weights
    if weights is not None:  # the organ's own mix (the chest's: tiny .35, small .35, medium .30)
        p = np.array([weights[allowed.index(n)] for n in fitting], dtype=np.float64)
        picks = rng.choice(len(fitting), size=1 if count is None else count, p=p / p.sum())
        if count is None:
            chosen = fitting[int(picks[0])]
            return [chosen] * _draw_count(config.size_class(chosen), rng)
        return [fitting[int(i)] for i in picks]
    if count is None:
        chosen = fitting[int(rng.integers(len(fitting)))]
        return [chosen] * _draw_count(config.size_class(chosen), rng)
    return [fitting[int(i)] for i in rng.integers(len(fitting), size=count)]


def too_small_error(
    geometry: OrganGeometry, size: str, radius_mm: float, config: SynthesisConfig, fitting: Sequence[str]
) -> OrganTooSmallError:
    largest_radius = geometry.max_depth_mm / max(config.min_depth_fraction, 1e-6)
    advice = (
        f"the largest size that fits is {fitting[-1]}" if fitting else "no size class fits"
    ) + f"; --radius-mm up to {largest_radius:.0f} fits"
    return OrganTooSmallError(
        f"the {geometry.organ.name} ({geometry.volume_ml:.1f} ml, at most "
        f"{geometry.max_depth_mm:.1f} mm deep) is too small for a {size} tumor "
        f"(radius {radius_mm:g} mm)",
        hint=advice,
    )


def _draw_count(size_class: SizeClass, rng: np.random.Generator) -> int:
    low, high = size_class.count
    return int(rng.integers(low, high + 1))


def sample_tumor_center(
    geometry: OrganGeometry,
    radius_mm: float,
    rng: np.random.Generator,
    *,
    min_depth_fraction: float,
) -> tuple[np.ndarray, float]:
    """Pick a tumor center inside the organ, preferring deep points in the organ's middle slab.

    Candidates are organ cells at least ``min_depth_fraction × radius_mm`` from the surface; the
    middle slab along the body axis is used when it has any. When the organ is too thin for that, the
    deepest cells are used. The returned voxel is always an organ voxel.

    Returns:
        (center voxel index in the organ's bounding box, shape ``(3,)``; its depth estimate in mm).
    """
    target = min_depth_fraction * radius_mm
    deep = geometry.depth_mm >= target
    candidates = deep & geometry.slab
    if not candidates.any():
        candidates = deep
    if not candidates.any():
        candidates = geometry.depth_mm >= geometry.depth_mm.max()
    cells = np.argwhere(candidates)
    cell = cells[int(rng.integers(len(cells)))]
    depth = float(geometry.depth_mm[tuple(cell)])
    corner = cell * geometry.coarse_step
    jitter = np.array([int(rng.integers(s)) for s in geometry.coarse_step])
    center = np.minimum(corner + jitter, np.array(geometry.mask.shape) - 1)
    if not geometry.mask[tuple(center)]:
        center = corner  # a strided sample of the mask: an organ voxel by construction
    return center, depth


@dataclass(frozen=True)
class TumorDraw:
    """The random parameters of one tumor: enough to evaluate its shape on any grid.

    Attributes:
        center: voxel index of the center in the organ's bounding box.
        radii_mm: ellipsoid radii along the array axes.
        controls_mm: displacement control values, shape ``(3 components, 3, 3, 3)``.
        half_extent_mm: the control points lie at -half, 0 and +half from the center.
        elastic_sigma_mm: the strength the controls were drawn with.
        edge_sigma_mm: the edge blur.
        depth_mm: depth estimate of the center.
    """

    center: np.ndarray
    radii_mm: np.ndarray
    controls_mm: np.ndarray
    half_extent_mm: float
    elastic_sigma_mm: float
    edge_sigma_mm: float
    depth_mm: float

    def reach_mm(self) -> np.ndarray:
        """Per axis, how far from the center the deformed tumor can reach (a strict bound)."""
        # Quadratic Lagrange weights on [-1, 1] sum in absolute value to at most 1.25.
        return self.radii_mm + 1.25 * np.abs(self.controls_mm).reshape(3, -1).max(axis=1)


def draw_displacement_controls(sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Control displacements of an elastic grid with 3 points per axis, shape ``(3, 3, 3, 3)``, mm.

    Like ``elasticdeform``'s random grid: one normal value of standard deviation ``sigma_mm`` per
    control point and displacement component.
    """
    return rng.normal(0.0, sigma_mm, size=(3, 3, 3, 3)).astype(np.float32)


def _quadratic_weights(coords_mm: np.ndarray, half_extent_mm: float) -> np.ndarray:
    """Quadratic Lagrange weights of the control points at -half, 0, +half, shape ``(n, 3)``.

    Coordinates beyond the control points are clamped to them. The three weights sum to 1.
    """
    t = np.clip(np.asarray(coords_mm, dtype=np.float32) / np.float32(half_extent_mm), -1.0, 1.0)
    return np.stack([t * (t - 1) / 2, 1 - t * t, t * (t + 1) / 2], axis=1)


def deformed_ellipsoid(
    axes_mm: Sequence[np.ndarray], radii_mm: Floats, controls_mm: np.ndarray, half_extent_mm: float
) -> np.ndarray:
    """A deformed ellipsoid on the grid whose coordinates (mm from the center) are ``axes_mm``.

    The ellipsoid is evaluated analytically at elastically displaced coordinates, so its edge is equally
    smooth at any voxel size and the same draw gives the same physical shape on any grid: a voxel at
    ``x`` is inside when ``sum_c ((x_c + u_c(x)) / r_c)^2 <= 1``, where the displacement ``u_c`` is
    ``controls_mm[c]`` interpolated quadratically between control points at -half, 0 and +half.

    Each normalised component is one matrix product over the box: the displacement is separable, and
    ``x_c / r_c`` is added to the small intermediate before the last contraction (over an axis other
    than ``c``, whose weights sum to 1).

    Returns:
        Bool mask, shape ``(len(axes_mm[0]), len(axes_mm[1]), len(axes_mm[2]))``.
    """
    w0, w1, w2 = (_quadratic_weights(a, half_extent_mm) for a in axes_mm)
    n0, n1, n2 = len(w0), len(w1), len(w2)
    radii = np.asarray(radii_mm, dtype=np.float32)
    coords = [np.asarray(a, dtype=np.float32) / r for a, r in zip(axes_mm, radii, strict=True)]
    controls = np.asarray(controls_mm, dtype=np.float32) / radii[:, None, None, None]
    value = np.empty((n0, n1, n2), dtype=np.float32)
    part = np.empty_like(value)
    for c in range(3):
        out = value if c == 0 else part
        if c < 2:  # contract axes 0 and 1, add x_c / r_c, then contract axis 2
            # (i, a) @ (a, j·c): the 3×3×3 controls contracted with the small weight matrices directly,
            # since einsum's path search would cost more than the products.
            inner = (w0 @ np.matmul(w1, controls[c]).reshape(3, -1)).reshape(n0, n1, 3)
            inner += coords[0][:, None, None] if c == 0 else coords[1][None, :, None]
            np.matmul(inner.reshape(n0 * n1, 3), w2.T, out=out.reshape(n0 * n1, n2))
        else:  # contract axes 1 and 2, add z / r_2, then contract axis 0
            inner = np.matmul(np.matmul(w1, controls[c]), w2.T)  # (a, j, k)
            inner += coords[2]
            np.matmul(w0, inner.reshape(3, n1 * n2), out=out.reshape(n0, n1 * n2))
        np.square(out, out=out)
        if c:
            value += part
    return value <= 1.0


def tumor_shape(
    axes_mm: Sequence[np.ndarray],
    radii_mm: Floats,
    *,
    half_extent_mm: float,
    elastic_sigma_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw an elastic deformation and evaluate the deformed ellipsoid on ``axes_mm`` (bool mask)."""
    controls = draw_displacement_controls(elastic_sigma_mm, rng)
    return deformed_ellipsoid(axes_mm, radii_mm, controls, half_extent_mm)


EDGE_TRUNCATE = 2.5  # the edge blur's kernel ends at 2.5 σ, which holds 98.8 % of its weight


def kernel_radius(sigma: float, truncate: float = EDGE_TRUNCATE) -> int:
    """Half-width in samples of a Gaussian of ``sigma`` samples cut at ``truncate`` σ (as scipy cuts it)."""
    return int(truncate * sigma + 0.5)


def gaussian_kernel(sigma: float, truncate: float = EDGE_TRUNCATE) -> np.ndarray:
    """A normalised 1D Gaussian kernel of ``sigma`` samples, cut at ``truncate`` σ."""
    radius = kernel_radius(sigma, truncate)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * np.square(x / sigma)) if sigma > 0 else (x == 0).astype(np.float64)
    return weights / weights.sum()


def _band_matrix(
    kernel: np.ndarray, n_in: int, n_out: int, shift: int, repeat: tuple[bool, bool] = (False, False)
) -> np.ndarray:
    """The matrix of a 1D correlation with ``kernel`` from ``n_in`` samples to ``n_out`` samples, float32.

    Output sample ``o`` lies at input position ``o - shift``. Beyond the input the signal is zero, or,
    where ``repeat`` says so for the low or high end, equal to the first or last input sample.
    """
    radius = len(kernel) // 2
    rows = np.arange(n_out)[:, None]
    position = rows - shift + np.arange(len(kernel))[None, :] - radius  # (row, tap) -> input sample
    if repeat[0]:
        position = np.maximum(position, 0)
    if repeat[1]:
        position = np.minimum(position, n_in - 1)
    inside = (position >= 0) & (position < n_in)
    weights = np.broadcast_to(kernel, position.shape)[inside]
    # Taps clamped onto one edge sample add up: one bincount over (row, column) does it.
    flat = np.bincount((rows * n_in + position)[inside], weights=weights, minlength=n_out * n_in)
    return flat.reshape(n_out, n_in).astype(np.float32)


_BAND_ROWS = 32  # output rows per matrix product: the band's zeros cost (rows + 2 r) / rows


def _correlate_along_rows(array: np.ndarray, matrix: np.ndarray, radius: int, shift: int, out: np.ndarray) -> None:
    """``out[..., o, :] = sum_i matrix[o, i] array[..., i, :]`` along axis -2, one band of rows at a time.

    ``array`` and ``out`` are 3D, and every output row lies within ``radius`` of the input rows (at
    ``o - shift``); each product reads only the input rows its band can reach.
    """
    n_in, n_out = array.shape[-2], out.shape[-2]
    for first in range(0, n_out, _BAND_ROWS):
        last = min(first + _BAND_ROWS, n_out)
        lo = max(first - shift - radius, 0)
        hi = min(last - shift + radius, n_in)
        np.matmul(matrix[first:last, lo:hi], array[..., lo:hi, :], out=out[..., first:last, :])


def blur_mask(
    mask: np.ndarray,
    sigma_mm: float,
    spacing: Floats,
    *,
    gain: float = 1.0,
    open_faces: Sequence[tuple[bool, bool]] = ((False, False),) * 3,
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Gaussian blur (physical σ) of a bool mask that is zero outside the array, times ``gain``.

    Equal to ``scipy.ndimage.gaussian_filter(mask, σ / spacing, mode="constant", truncate=2.5)``
    (to float32 rounding), but only the box where the result can be non-zero is computed: the mask's
    bounding box grown by the kernel's radius (within the array). Each 1D pass is a matrix product
    with the kernel's band matrix, from the extent where its input can be non-zero to the grown one:
    BLAS runs these several times faster than a line-by-line filter runs across the memory layout.

    ``open_faces`` names, per axis, the low and high faces of the array beyond which the mask goes
    on unseen (the field of view's edge): there the mask's last slice is repeated (scipy's
    ``mode="nearest"``) instead of zeros.

    Returns:
        (the blurred values in that box, float32; the box, as slices of ``mask``).

    Raises:
        ValueError: the mask is empty.
    """
    tight = bounding_box(mask)
    if tight is None:
        raise ValueError("cannot blur an empty mask")
    kernels = [gaussian_kernel(sigma_mm / float(s)) for s in spacing]
    radii = [len(k) // 2 for k in kernels]
    grown = tuple(
        slice(max(t.start - r, 0), min(t.stop + r, n)) for t, r, n in zip(tight, radii, mask.shape, strict=True)
    )
    n_in = [t.stop - t.start for t in tight]
    n_out = [g.stop - g.start for g in grown]
    shift = [t.start - g.start for t, g in zip(tight, grown, strict=True)]
    repeat = [
        (low and t.start == 0, high and t.stop == n)
        for (low, high), t, n in zip(open_faces, tight, mask.shape, strict=True)
    ]
    matrices = [
        _band_matrix(k, i, o, sh, r) for k, i, o, sh, r in zip(kernels, n_in, n_out, shift, repeat, strict=True)
    ]
    values = mask[tight].astype(np.float32)
    # The last (contiguous) axis first, while the array is smallest: one product for all of it.
    values = values @ (matrices[2] * np.float32(gain)).T
    along0 = np.empty((n_out[0], n_in[1], n_out[2]), dtype=np.float32)
    # Axis 0 is axis -2 of the array seen as (1, I, J K).
    _correlate_along_rows(
        values.reshape(1, n_in[0], -1), matrices[0], radii[0], shift[0], along0.reshape(1, n_out[0], -1)
    )
    out = np.empty(tuple(n_out), dtype=np.float32)
    _correlate_along_rows(along0, matrices[1], radii[1], shift[1], out)
    return out, (grown[0], grown[1], grown[2])


def _interpolation_weights(n_in: int, n_out: int, step_out: float, step_in: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower source index and weight of the upper one, per output sample, for linear interpolation
    between two grids centred on each other (``n_in >= 2``)."""
    pos = (np.arange(n_out) - (n_out - 1) / 2) * (step_out / step_in) + (n_in - 1) / 2
    pos = np.clip(pos, 0, n_in - 1)
    low = np.minimum(np.floor(pos).astype(np.intp), n_in - 2)
    return low, (pos - low).astype(np.float32)


def _interpolate_axis(array: np.ndarray, axis: int, n_out: int, step_out: float, step_in: float) -> np.ndarray:
    """Linear interpolation along one axis between two grids centred on each other."""
    low, frac = _interpolation_weights(array.shape[axis], n_out, step_out, step_in)
    shape = [1, 1, 1]
    shape[axis] = n_out
    a = np.take(array, low, axis=axis)
    b = np.take(array, low + 1, axis=axis)
    b -= a
    b *= frac.reshape(shape)
    a += b
    return a


def _multiply_interpolated_rows(target: np.ndarray, coarse: np.ndarray, step_out: float, step_in: float) -> None:
    """``target *= coarse`` linearly interpolated along axis 0, one row at a time (no full-size temporary)."""
    low, frac = _interpolation_weights(coarse.shape[0], target.shape[0], step_out, step_in)
    diff = coarse[1:] - coarse[:-1]
    row = np.empty(coarse.shape[1:], dtype=np.float32)
    for i, (j, f) in enumerate(zip(low, frac, strict=True)):
        np.multiply(diff[j], f, out=row)
        row += coarse[j]
        target[i] *= row


def tumor_texture(
    shape: Sequence[int],
    spacing: Floats,
    rng: np.random.Generator,
    config: SynthesisConfig,
    *,
    multiply: np.ndarray | None = None,
) -> np.ndarray:
    """The tumor texture for a box of ``shape`` voxels of ``spacing`` mm, values in [0, 1], float32.

    SyntheticTumors' recipe at ``config.texture_spacing_mm``: uniform noise, Gaussian σa, scaled to
    [b, b + s], Bernoulli sample, Gaussian σb, rescaled so that the mean of values above the threshold
    is u0, clipped. Two changes keep it exact in distribution but cheap and size-independent:

    - the Bernoulli samples of ``texture_bin``³ neighbouring cells are drawn at once as one binomial
      count on a grid ``texture_bin`` times coarser (σb spans several of its cells, so blurring the
      cell averages is blurring the samples);
    - the noise is normalised by its expected spread instead of the box's min and max, so a small box
      has the statistics of the reference's large volume.

    The grid is then resampled linearly to the box's voxels. With ``multiply`` (a float32 array of
    ``shape``), that array is multiplied in place by the texture and returned, and the texture itself
    is never held at full size.
    """
    step_mm = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(shape) * step_mm
    bin_ = max(1, int(config.texture_bin))
    step = config.texture_spacing_mm * bin_
    grid = tuple(int(n) for n in np.maximum(2, np.ceil(extent / step).astype(int) + 1))
    sigma_a = config.texture_sigma_a_mm / step
    noise = rng.random(grid, dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma_a, mode="wrap", truncate=3.0)
    # Uniform noise has std 1/sqrt(12); a 3D Gaussian of σ cells divides it by (2 sqrt(pi) σ)^(3/2).
    spread = (1 / np.sqrt(12)) / (2 * np.sqrt(np.pi) * sigma_a) ** 1.5
    # The reference normalises by min/max over ~4e7 voxels, about ±5.3 standard deviations.
    normalised = np.clip((smooth - 0.5) / (10.6 * spread) + 0.5, 0.0, 1.0)
    base = rng.uniform(*config.texture_base)
    scale = rng.uniform(*config.texture_scale)
    probability = base + scale * normalised
    trials = bin_**3
    sample = (rng.binomial(trials, probability) / trials).astype(np.float32)
    texture = ndimage.gaussian_filter(sample, config.texture_sigma_b_mm / step, mode="wrap", truncate=3.0)
    above = texture > config.texture_threshold
    target_mean = rng.uniform(*config.texture_mean)
    if above.any():
        texture *= np.float32(target_mean / texture[above].mean())
    np.clip(texture, 0.0, 1.0, out=texture)
    for axis in (2, 1):
        texture = _interpolate_axis(texture, axis, int(shape[axis]), float(step_mm[axis]), step)
    if multiply is None:
        return _interpolate_axis(texture, 0, int(shape[0]), float(step_mm[0]), step)
    if multiply.shape != tuple(shape):
        raise ValueError(f"multiply has shape {multiply.shape}, not {tuple(shape)}")
    _multiply_interpolated_rows(multiply, texture, float(step_mm[0]), step)
    return multiply


def _grid_axes(
    lo: np.ndarray, hi: np.ndarray, center: np.ndarray, spacing: np.ndarray, step: np.ndarray | int = 1
) -> list[np.ndarray]:
    """mm coordinates, relative to ``center``, of voxel indices lo..hi (exclusive) every ``step``."""
    step = np.broadcast_to(np.asarray(step), (3,))
    return [(np.arange(a, b, st) - c) * s for a, b, c, s, st in zip(lo, hi, center, spacing, step, strict=True)]


def _draw_tumor(
    geometry: OrganGeometry,
    base_radius: float,
    exact: bool,
    elastic_range_mm: tuple[float, float],
    rng: np.random.Generator,
    config: SynthesisConfig,
) -> TumorDraw:
    center, depth = sample_tumor_center(geometry, base_radius, rng, min_depth_fraction=config.min_depth_fraction)
    low, high = config.radius_jitter
    radii = np.full(3, float(base_radius)) if exact else base_radius * rng.uniform(low, high, size=3)
    elastic = float(rng.uniform(*elastic_range_mm))
    edge = float(rng.uniform(*config.edge_sigma_mm))
    controls = draw_displacement_controls(elastic, rng)
    return TumorDraw(center, radii, controls, float(radii.max()) + 3.0 * elastic, elastic, edge, depth)


def _coarse_fit(draw: TumorDraw, geometry: OrganGeometry) -> tuple[float, np.ndarray, np.ndarray] | None:
    """Evaluate a draw on the organ's coarse grid: the share kept inside the organ and the box it needs.

    Returns None when the tumor is too small for the coarse grid to see it.
    """
    step, spacing = geometry.coarse_step, geometry.spacing
    reach = np.ceil(draw.reach_mm() / spacing).astype(int)
    lo = np.maximum(draw.center - reach, 0)
    hi = np.minimum(draw.center + reach + 1, geometry.mask.shape)
    first = -(-lo // step)  # first coarse cell at or after lo
    last = -(-hi // step)
    if np.any(last - first < 2):
        return None
    axes = _grid_axes(first * step, last * step, draw.center, spacing, step)
    shape = deformed_ellipsoid(axes, draw.radii_mm, draw.controls_mm, draw.half_extent_mm)
    total = int(shape.sum())
    if total < 8:
        return None
    inside = shape & geometry.coarse_mask[first[0] : last[0], first[1] : last[1], first[2] : last[2]]
    if not inside.any():
        return 0.0, lo, lo
    cells = np.argwhere(inside)
    # One coarse cell of slack each side covers the fine edge the coarse grid cannot see.
    fine_lo = np.maximum((cells.min(axis=0) + first - 1) * step, lo)
    fine_hi = np.minimum((cells.max(axis=0) + first + 2) * step, hi)
    return int(inside.sum()) / total, fine_lo, fine_hi


def _tumor_voxels(
    draw: TumorDraw, geometry: OrganGeometry, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """The tumor's voxels inside the organ, on their bounding box, and that box's first corner.

    The draw is evaluated on the box ``lo..hi`` of the organ's box (the coarse fit's). Wherever the
    tumor touches a face of it that is not a face of the organ's box or of the tumor's strict reach,
    that face moves out by a coarse cell and the box is evaluated again, so the tumor is never cut by
    the box. Returns None when no voxel of the tumor lies in the organ.
    """
    reach = np.ceil(draw.reach_mm() / geometry.spacing).astype(int)
    limit_lo = np.maximum(draw.center - reach, 0)
    limit_hi = np.minimum(draw.center + reach + 1, geometry.mask.shape)
    lo, hi = np.maximum(lo, limit_lo), np.minimum(hi, limit_hi)
    while True:
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        axes = _grid_axes(lo, hi, draw.center, geometry.spacing)
        shape = deformed_ellipsoid(axes, draw.radii_mm, draw.controls_mm, draw.half_extent_mm)
        shape &= geometry.mask[box]
        tight = bounding_box(shape)
        if tight is None:
            return None
        start = np.array([t.start for t in tight])
        stop = np.array([t.stop for t in tight])
        grow_lo = (start == 0) & (lo > limit_lo)
        grow_hi = (stop == hi - lo) & (hi < limit_hi)
        if not (grow_lo.any() or grow_hi.any()):
            return shape[tight], lo + start
        lo = np.where(grow_lo, np.maximum(lo - geometry.coarse_step, limit_lo), lo)
        hi = np.where(grow_hi, np.minimum(hi + geometry.coarse_step, limit_hi), hi)


def place_tumor(
    geometry: OrganGeometry,
    *,
    size_class: str,
    radius_mm: float | None,
    elastic_range_mm: tuple[float, float],
    rng: np.random.Generator,
    config: SynthesisConfig,
) -> TumorGeometry:
    """Place one tumor in the organ and make its geometry: voxels, edge and texture (no intensity).

    A draw is first evaluated on the organ's coarse grid: a placement that keeps less than
    ``min_kept_fraction`` of the tumor inside the organ is re-drawn (cheaply), and the fine work is
    done only on the bounding box of what is kept.

    Args:
        geometry: the prepared organ.
        size_class: the size class name (or "custom" with ``radius_mm``).
        radius_mm: exact base radius, or None to draw each axis in ``radius_jitter`` × R of the class.
        elastic_range_mm: range of the elastic displacement strength.
        rng: the call's random generator.
        config: engine constants.

    Returns:
        The tumor's box in the organ's bounding box, its voxels, its profile ``blur(mask) · texture``
        inside the organ, and its record (center relative to the organ's box; no intensity yet).
    """
    spacing = geometry.spacing
    organ = geometry.organ
    base_radius = radius_mm if radius_mm is not None else config.size_class(size_class).radius_mm
    best: tuple[float, TumorDraw, np.ndarray, np.ndarray] | None = None
    for _ in range(config.max_placement_attempts):
        draw = _draw_tumor(geometry, base_radius, radius_mm is not None, elastic_range_mm, rng, config)
        fit = _coarse_fit(draw, geometry)
        if fit is None:  # smaller than the coarse grid: the fine box is small anyway
            reach = np.ceil(draw.reach_mm() / spacing).astype(int)
            fit = (1.0, np.maximum(draw.center - reach, 0), np.minimum(draw.center + reach + 1, geometry.mask.shape))
        kept, lo, hi = fit
        if best is None or kept > best[0]:
            best = (kept, draw, lo, hi)
        if kept >= config.min_kept_fraction:
            break
    assert best is not None
    kept, draw, lo, hi = best
    found = _tumor_voxels(draw, geometry, lo, hi)
    if found is None:
        raise OrganTooSmallError(
            f"could not place a {size_class} tumor inside the {organ.name} after {config.max_placement_attempts} attempts",
            hint="use a smaller --size or --radius-mm",
        )
    # Grow the tumor's box by the edge blur's reach (within the organ's box): the image changes there.
    tight, corner = found
    radius = np.array([kernel_radius(draw.edge_sigma_mm / s) for s in spacing])
    lo = np.maximum(corner - radius, 0)
    hi = np.minimum(corner + tight.shape + radius, geometry.mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    shape = np.zeros(hi - lo, dtype=bool)
    shape[tuple(slice(int(a), int(a) + n) for a, n in zip(corner - lo, tight.shape, strict=True))] = tight
    # The organ (and so the tumor) may go on beyond the field of view: there the edge is not blurred.
    open_faces = [
        (bool(a == 0 and low), bool(b == n and high))
        for a, b, n, (low, high) in zip(lo, hi, geometry.mask.shape, geometry.at_volume_edge, strict=True)
    ]
    profile, _ = blur_mask(shape, draw.edge_sigma_mm, spacing, open_faces=open_faces)
    tumor_texture(profile.shape, spacing, rng, config.texture_for(organ.region, rng), multiply=profile)
    profile *= geometry.mask[box]  # the image changes inside the organ only
    voxels = int(np.count_nonzero(shape))
    record = TumorRecord(
        organ=organ.name,
        size_class=size_class,
        center_voxel=(int(draw.center[0]), int(draw.center[1]), int(draw.center[2])),
        radii_mm=tuple(round(float(r), 3) for r in draw.radii_mm),  # type: ignore[arg-type]
        elastic_sigma_mm=round(draw.elastic_sigma_mm, 3),
        edge_sigma_mm=round(draw.edge_sigma_mm, 3),
        intensity_change_hu=0.0,
        depth_mm=round(draw.depth_mm, 2),
        voxels=voxels,
        volume_ml=round(voxels * geometry.voxel_volume_ml, 4),
        kept_fraction=round(kept, 3),
    )
    return TumorGeometry(box, shape, profile, record)


@dataclass
class Placement:
    """The tumors placed in one organ, before any intensity change.

    Attributes:
        tumors: each tumor's geometry (boxes within ``bbox``; record centers in volume voxels).
        tumor_mask: bool mask of all tumor voxels over ``bbox``.
        bbox: the organ's bounding box in the volume.
        notes: what the engine decided on the user's behalf (sizes dropped, tumors not placed, ...).
        organ_mask: the organ's voxels over ``bbox`` (bool), before the tumors.
    """

    tumors: list[TumorGeometry]
    tumor_mask: np.ndarray
    bbox: tuple[slice, slice, slice]
    notes: list[str]
    organ_mask: np.ndarray | None = None

    def profile(self) -> np.ndarray:
        """The tumors' profiles over ``bbox`` (float32); where they overlap, the larger one."""
        out = np.zeros(self.tumor_mask.shape, dtype=np.float32)
        for tumor in self.tumors:
            np.maximum(out[tumor.box], tumor.profile, out=out[tumor.box])
        return out


def place_tumors(
    organ_mask: np.ndarray | None,
    organ: Organ,
    *,
    spacing: Floats,
    affine: np.ndarray,
    rng: np.random.Generator,
    size: str = "mix",
    count: int | None = 1,
    radius_mm: float | None = None,
    config: SynthesisConfig | None = None,
    geometry: OrganGeometry | None = None,
) -> Placement:
    """Place tumors in one organ: their voxels, edges and textures, whatever the intensity engine.

    Arguments as :func:`synthesize_in_organ` (``organ_mask`` may be None when ``geometry`` is given).
    At most ``config.max_tumor_share`` of the organ becomes tumor, the first tumor included: a first
    tumor that would pass it is drawn again, up to ``config.max_placement_attempts`` times, and with
    ``size="mix"`` then from the smaller classes (a note says so); if none fits, it is an
    :class:`OrganTooSmallError`. A later tumor that would pass it is not placed, nor any after it (a
    note says so).
    """
    config = config or SynthesisConfig()
    if geometry is None:
        if organ_mask is None:
            raise ValueError("pass the organ's mask or its prepared geometry")
        geometry = prepare_organ(organ_mask, organ, spacing=spacing, affine=affine, config=config)
    else:
        geometry.notes.clear()
    if radius_mm is not None:
        if radius_mm <= 0:
            raise ValueError("radius_mm must be positive")
        if not geometry.fits(radius_mm, config.min_depth_fraction):
            fitting = [
                n
                for n in organ.size_classes
                if geometry.fits(config.size_class(n).radius_mm, config.min_depth_fraction)
            ]
            raise too_small_error(geometry, f"{radius_mm:g} mm", radius_mm, config, fitting)
        classes = ["custom"] * (count if count is not None else 1)
    else:
        classes = plan_size_classes(size, count, geometry, config, rng)
    tumor_mask = np.zeros(geometry.mask.shape, dtype=bool)
    offset = np.array([s.start for s in geometry.bbox])
    budget = config.max_tumor_share * geometry.organ_voxels
    covered = 0
    tumors: list[TumorGeometry] = []
    for n, planned in enumerate(classes):
        if n == 0:  # the first tumor is drawn again until it fits the budget; mix then tries smaller classes
            options = [planned]
            if size == "mix" and radius_mm is None:
                options += list(reversed(organ.size_classes[: organ.size_classes.index(planned)]))
            for size_class in options:
                tumor, added = _draw_within_budget(
                    tumor_mask, geometry, size_class, radius_mm, budget, rng=rng, config=config,
                    attempts=config.max_placement_attempts,
                )  # fmt: skip
                if tumor is not None:
                    break
            if tumor is None:
                raise OrganTooSmallError(
                    f"a {options[-1]} tumor takes more than {config.max_tumor_share:.0%} of the {organ.name} "
                    f"({geometry.volume_ml:.1f} ml) in each of {config.max_placement_attempts} draws "
                    f"(the last: {added / geometry.organ_voxels:.0%}; rules.max_tumor_share)",
                    hint="use a smaller --size or --radius-mm, or raise rules.max_tumor_share",
                )
            if size_class != planned:
                geometry.notes.append(
                    f"mix: a {planned} tumor would make more than {config.max_tumor_share:.0%} of the "
                    f"{organ.name} tumor; drew a {size_class} one (rules.max_tumor_share)"
                )
        else:
            tumor, added = _draw_within_budget(
                tumor_mask, geometry, planned, radius_mm, budget - covered, rng=rng, config=config, attempts=1
            )
            if tumor is None:
                geometry.notes.append(
                    f"placed {n} of {len(classes)} tumors: the next would make more than "
                    f"{config.max_tumor_share:.0%} of the {organ.name} tumor (rules.max_tumor_share)"
                )
                break
        covered += added
        tumor_mask[tumor.box] |= tumor.mask
        record = tumor.record
        center = np.array(record.center_voxel) + offset
        record.center_voxel = tuple(int(v) for v in center)
        record.center_mm = tuple(round(float(v), 2) for v in center @ affine[:3, :3].T + affine[:3, 3])
        tumors.append(tumor)
    return Placement(tumors, tumor_mask, geometry.bbox, list(geometry.notes), geometry.mask)


def _draw_within_budget(
    tumor_mask: np.ndarray,
    geometry: OrganGeometry,
    size_class: str,
    radius_mm: float | None,
    budget: float,
    *,
    rng: np.random.Generator,
    config: SynthesisConfig,
    attempts: int,
) -> tuple[TumorGeometry | None, int]:
    """Draw a tumor that adds at most ``budget`` tumor voxels, up to ``attempts`` times.

    Returns:
        (the tumor, the voxels it adds), or (None, the voxels the last draw would have added).
    """
    added = 0
    for _ in range(attempts):
        tumor = place_tumor(
            geometry,
            size_class=size_class,
            radius_mm=radius_mm,
            elastic_range_mm=elastic_range(size_class, radius_mm, config),
            rng=rng,
            config=config,
        )
        added = int(np.count_nonzero(tumor.mask & ~tumor_mask[tumor.box]))
        if added <= budget:
            return tumor, added
    return None, added


def elastic_range(size_class: str, radius_mm: float | None, config: SynthesisConfig) -> tuple[float, float]:
    """The elastic strength range of a size class, or of the class nearest in size to ``radius_mm``."""
    if radius_mm is None:
        return config.size_class(size_class).elastic_sigma_mm
    nearest = min(SIZE_CLASSES, key=lambda n: abs(np.log(config.size_class(n).radius_mm / radius_mm)))
    sc = config.size_class(nearest)
    factor = radius_mm / sc.radius_mm
    return (sc.elastic_sigma_mm[0] * factor, sc.elastic_sigma_mm[1] * factor)


@dataclass
class SynthesisResult:
    """The result of :func:`synthesize_in_organ`, as changes over the organ's bounding box.

    Attributes:
        source: the input image (not modified).
        patches: per tumor, a box within ``bbox`` and the float32 intensity change there. Where tumors
            overlap, the change of largest magnitude wins (:func:`~freetumor_cli.core.engines.compose_changes`).
        tumor_mask: bool mask of synthetic tumor voxels over ``bbox``.
        bbox: the organ's bounding box in the volume.
        tumors: one record per tumor, centers in volume voxel indices.
        notes: what the engine decided on the user's behalf (sizes dropped, ...).
    """

    source: np.ndarray
    patches: list[tuple[tuple[slice, ...], np.ndarray]]
    tumor_mask: np.ndarray
    bbox: tuple[slice, slice, slice]
    tumors: list[TumorRecord]
    notes: list[str]

    def change(self) -> np.ndarray:
        """The composed intensity change over ``bbox``, float32."""
        return compose_changes(self.patches, self.tumor_mask.shape)

    @property
    def image(self) -> np.ndarray:
        """The organ's bounding box after insertion, float32 (allocated on each access)."""
        return self.source[self.bbox].astype(np.float32) + self.change()

    def apply(self, out: np.ndarray) -> np.ndarray:
        """Write the changed voxels into ``out`` (a copy of the source volume), cast to its dtype.

        Only the tumors' boxes are touched: unchanged voxels keep their exact values.
        """
        from freetumor_cli.core.io import cast_like

        if not self.patches:
            return out
        lo = np.min([[s.start for s in box] for box, _ in self.patches], axis=0)
        hi = np.max([[s.stop for s in box] for box, _ in self.patches], axis=0)
        union = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        shifted = [
            (tuple(slice(s.start - a, s.stop - a) for s, a in zip(box, lo, strict=True)), delta)
            for box, delta in self.patches
        ]
        change = compose_changes(shifted, hi - lo)
        region = out[self.bbox][union]
        changed = change != 0
        region[changed] = cast_like(region[changed].astype(np.float32) + change[changed], out.dtype)
        return out


def synthesize_in_organ(
    image: np.ndarray,
    organ_mask: np.ndarray | None,
    organ: Organ,
    *,
    spacing: Floats,
    affine: np.ndarray,
    rng: np.random.Generator,
    size: str = "mix",
    count: int | None = 1,
    radius_mm: float | None = None,
    config: SynthesisConfig | None = None,
    geometry: OrganGeometry | None = None,
    intensity: IntensityModel | None = None,
) -> SynthesisResult:
    """Insert tumors into one organ of a CT volume.

    Args:
        image: the CT in HU, shape ``(I, J, K)`` (not modified).
        organ_mask: bool mask of the target organ (healthy tissue), same shape (None with ``geometry``).
        organ: the organ's registry entry (decides the sign of the change).
        spacing: voxel size in mm per array axis.
        affine: voxel-to-world matrix.
        rng: the only source of randomness.
        size: a size class or ``"mix"``.
        count: number of tumors; None draws it from the size class's range.
        radius_mm: exact base radius in mm (overrides ``size``).
        config: engine constants.
        geometry: a prepared organ (from :func:`prepare_organ`) to reuse across calls.
        intensity: the intensity model; the rule engine's for the organ's region by default.

    Raises:
        LabelError: the organ is absent.
        OrganTooSmallError: the organ cannot hold the asked size.
    """
    config = config or SynthesisConfig()
    placement = place_tumors(
        organ_mask, organ, spacing=spacing, affine=affine, rng=rng, size=size, count=count,
        radius_mm=radius_mm, config=config, geometry=geometry,
    )  # fmt: skip
    model = intensity or RuleIntensity.for_region(organ.region, config)
    scene = Scene(image, affine, placement.bbox, organ, placement.organ_mask)
    patches = apply_intensity(placement.tumors, model, scene, rng)
    records = [t.record for t in placement.tumors]
    return SynthesisResult(image, patches, placement.tumor_mask, placement.bbox, records, placement.notes)
