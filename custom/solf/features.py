"""SOLF stage A: per-volume component cleaning and per-organ shape features in physical units.

Plain NumPy/SciPy functions and numba kernels (no MONAI, no torch) so that the batch runner's worker
processes stay light; :mod:`custom.solf.transforms` wraps them as MONAI transforms.

Speed: the volume is read as runs of voxels along its contiguous axis (:mod:`custom.solf.kernels`);
connected components of every organ are unions of touching runs, and their voxel counts, index
moments and boxes are sums over runs; one more pass over the 2x2x2 cubes gives every organ's
marching-cubes area. Nothing scans the volume once per organ (body-wide fat and muscle labels span
the whole volume).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from custom.checks import check_label_ids
from custom.labels import UKBOB_COMPONENT_RANGES, UKBOB_LABELS, ComponentRange
from custom.solf import kernels

#: a component is kept only if it has at least this fraction of the organ's largest component
DEFAULT_MIN_FRACTION = 0.01
FEATURES = ("norm_volume", "sphericity", "eccentricity")
#: an organ whose mask comes within this many voxels of the field-of-view border is "partial"
#: (TotalSegmentator's ``touches_border`` rule): the scan cuts it, so its shape is not judged
BORDER_MARGIN = 3


def voxel_matrix(affine: np.ndarray | None) -> np.ndarray:
    """The 3x3 voxel-index -> mm matrix of a 4x4 affine (identity, i.e. 1 mm voxels, when ``None``)."""
    if affine is None:
        return np.eye(3)
    return np.asarray(affine, dtype=np.float64)[:3, :3]


def voxel_spacing(affine: np.ndarray | None) -> np.ndarray:
    """Voxel edge lengths in mm along the three array axes (column norms of the affine)."""
    return np.linalg.norm(voxel_matrix(affine), axis=0)


def voxel_volume_ml(affine: np.ndarray | None) -> float:
    """Volume of one voxel in mL (|det| of the affine's 3x3 part, mm^3, / 1000)."""
    return abs(float(np.linalg.det(voxel_matrix(affine)))) / 1000.0


def _compact(labels: np.ndarray, hi: int | None = None) -> np.ndarray:
    """``labels`` in the smallest unsigned dtype that holds its ids (ids already checked >= 0; ``hi``:
    their maximum, when known). A uint8 map is returned as it is, without a scan."""
    if labels.dtype == np.uint8:
        return labels
    if hi is None:
        hi = int(labels.max()) if labels.size else 0
    dtype = np.uint8 if hi < 2**8 else np.uint16 if hi < 2**16 else np.uint32
    return labels if labels.dtype == dtype else labels.astype(dtype)


def _c_view(a: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A C-contiguous view of ``a`` (a transpose of an F-ordered NIfTI array, a copy only when neither)
    and ``axes``: view axis i is axis ``axes[i]`` of ``a``."""
    if a.flags.c_contiguous:
        return a, (0, 1, 2)
    if a.flags.f_contiguous:
        return a.T, (2, 1, 0)
    return np.ascontiguousarray(a), (0, 1, 2)


@dataclass
class Components:
    """Every connected component of a label map (26-connectivity, one label per component), from one
    multi-label pass. Arrays are indexed by component id 1..n (index 0 is background). Coordinates
    are voxel indices along the axes of the label map."""

    label: np.ndarray  #: (n + 1,) organ id of each component
    voxels: np.ndarray  #: (n + 1,) voxel count
    first: np.ndarray  #: (n + 1, 3) sums of the voxel indices
    second: np.ndarray  #: (n + 1, 3, 3) sums of products of the voxel indices
    lo: np.ndarray  #: (n + 1, 3) bounding box start (inclusive)
    hi: np.ndarray  #: (n + 1, 3) bounding box end (exclusive)
    runs: tuple[np.ndarray, ...]  #: ``(row_start, begin, end)`` of :func:`kernels.find_runs` on the C-ordered view
    run_component: np.ndarray  #: component id of each run
    order: str  #: memory order ("C" or "F") whose C-ordered view the runs index


def connected_components(labels: np.ndarray) -> Components:
    """Label every organ's components in one pass and measure them, all on runs of voxels.

    A run is a stretch of one id along a row of the contiguous axis; a UKBOB-sized map of 14.4 M
    voxels has ~0.35 M of them. Components are unions of touching runs of one id (26-connectivity),
    and a run's voxel count, index sums and products have closed forms, so counts, moments and boxes
    of all components cost O(runs) after one read of the volume (:mod:`custom.solf.kernels`).

    Args:
        labels: label map ``(H, W, D)`` of non-negative ids in an unsigned dtype (:func:`_compact`), any memory order.
    """
    view, axes = _c_view(labels)
    row_start, begin, end, run_label = kernels.find_runs(view)
    comp, label, voxels, first, second, lo, hi = kernels.run_components(row_start, begin, end, run_label, view.shape[1])
    back = np.argsort(axes)  # view axis i is axis axes[i] of labels
    return Components(
        label, voxels, first[:, back], second[:, back][:, :, back], lo[:, back], hi[:, back], (row_start, begin, end), comp,
        "F" if axes == (2, 1, 0) else "C",
    )


def _kept(comps: Components, ranges: Mapping[int, ComponentRange], min_fraction: float, clean: bool) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """Which components survive cleaning (bool, indexed by component id) and each organ's counts (before, after)."""
    keep = np.ones(len(comps.label), dtype=bool)
    keep[0] = False
    ids = np.arange(1, len(comps.label))
    ids = ids[np.lexsort((-comps.voxels[ids], comps.label[ids]))]  # by organ, largest component first
    organs, begin = np.unique(comps.label[ids], return_index=True)
    counts: dict[int, tuple[int, int]] = {}
    for organ, group in zip(organs.tolist(), np.split(ids, begin[1:])):
        rng = ranges.get(organ)
        if clean and rng is not None and rng.reduce and len(group) > 1:
            sizes = comps.voxels[group]
            small = sizes < min_fraction * sizes[0]
            small[max(rng.max_count, 1) :] = True
            keep[group[small]] = False
        counts[organ] = (len(group), int(keep[group].sum()))
    return keep, counts


def _remove(labels: np.ndarray, comps: Components, keep: np.ndarray, copy: bool = True) -> np.ndarray:
    """``labels`` (a copy unless ``copy=False``) with the components not in ``keep`` set to 0, run by run.

    The runs index the C-ordered view of an array in ``comps.order``; a strided input (e.g. a permuted
    tensor's array) is copied into that order even with ``copy=False``, so no erasure is lost or misplaced.
    """
    in_order = labels.flags["F_CONTIGUOUS" if comps.order == "F" else "C_CONTIGUOUS"]
    out = labels if not copy and in_order else np.array(labels, order=comps.order, copy=True)
    kernels.erase_runs(out.T if comps.order == "F" else out, *comps.runs, comps.run_component, ~keep)
    return out


def clean_components(
    labels: np.ndarray,
    ranges: Mapping[int, ComponentRange] = UKBOB_COMPONENT_RANGES,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """Remove stray fragments of each organ, following its expected component range.

    For an organ whose range allows ``reduce``, components smaller than ``min_fraction`` of its
    largest component are removed, then at most ``max_count`` of the largest are kept; removed voxels
    become background (0). Organs with ``reduce=False`` (vessels) and ids without a range are kept
    as they are. All organs' components come from one multi-label pass (:func:`connected_components`).

    Args:
        labels: integer label map ``(H, W, D)`` with ids >= 0.
        ranges: organ id -> :class:`~custom.labels.ComponentRange`.
        min_fraction: relative size threshold, in (0, 1].

    Returns:
        ``(cleaned copy of labels, {organ id: (components before, components after)})``.
    """
    comps = connected_components(_compact(np.asarray(labels)))
    keep, counts = _kept(comps, ranges, min_fraction, clean=True)
    return _remove(labels, comps, keep), counts


def body_volume_ml(
    labels: np.ndarray, affine: np.ndarray | None, image: np.ndarray | None = None, threshold: float | None = None
) -> float:
    """Body volume in mL: the image foreground when an image is given, else the union of all labels.

    Args:
        labels: label map ``(H, W, D)``.
        affine: 4x4 voxel -> mm matrix.
        image: optional ``(H, W, D)`` or channel-first ``(C, H, W, D)`` intensities on the same grid.
        threshold: foreground threshold on the channel maximum (Otsu's threshold when ``None``).
    """
    voxel_ml = voxel_volume_ml(affine)
    if image is None:
        return float(np.count_nonzero(labels)) * voxel_ml
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 4:
        img = img.max(axis=0)
    if threshold is None:
        from skimage.filters import threshold_otsu

        threshold = float(threshold_otsu(img[::2, ::2, ::2]))
    fg = ndimage.binary_fill_holes(img > threshold)
    return float(np.count_nonzero(fg)) * voxel_ml


@functools.lru_cache(maxsize=64)
def _cube_areas(spacing: tuple[float, float, float]) -> np.ndarray:
    """Marching-cubes surface area (mm^2) inside one 2x2x2 cube, for each of its 256 binary corner patterns."""
    from skimage.measure import marching_cubes, mesh_surface_area

    table = np.zeros(256)
    for code in range(1, 255):  # corner k sits at (k & 1, k >> 1 & 1, k >> 2 & 1)
        cube = np.array([(code >> k) & 1 for k in range(8)], np.float32).reshape(2, 2, 2, order="F")
        verts, faces, _, _ = marching_cubes(cube, level=0.5, spacing=spacing)
        table[code] = mesh_surface_area(verts, faces)
    return table


def surface_areas_mm2(labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Marching-cubes surface area (mm^2) of every organ of a label map, in one pass.

    At level 0.5 on a binary mask the marching-cubes triangles inside each 2x2x2 cube of voxel centres
    depend only on that cube's 8 corners, so an organ's area is ``sum(count of each corner pattern x
    its area)``: the same number as ``skimage.measure.marching_cubes`` + ``mesh_surface_area`` on the
    organ's mask padded with background (a test checks it), without building a mesh. Only cubes whose
    corners are not all one id hold any surface; each organ present at such a cube's corners gets
    that cube's pattern for its own mask.

    The masks are not smoothed: the staircase of a binary mask makes the area ~8% larger than the
    smooth surface (a voxelised sphere's sphericity is 0.90-0.93), a bias that barely depends on organ
    size, so it cancels in SOLF's per-organ cohort comparison. Smoothing would push small organs above 1.

    Args:
        labels: integer label map ``(H, W, D)`` with ids >= 0.
        spacing: voxel edge lengths in mm along the three axes.

    Returns:
        ``(max id + 1,)`` areas in mm^2 indexed by id (0 for ids absent; index 0 is background).
    """
    labels = _compact(np.asarray(labels))
    return _surface_areas(labels, spacing, int(labels.max(initial=0)) + 1)


def _surface_areas(labels: np.ndarray, spacing: Sequence[float], n_ids: int) -> np.ndarray:
    """:func:`surface_areas_mm2` of a compact map whose ids are below ``n_ids`` (no scan for the maximum)."""
    view, axes = _c_view(labels)
    return kernels.surface_areas(view, _cube_areas(tuple(float(spacing[ax]) for ax in axes)), n_ids)


@dataclass(frozen=True)
class OrganFeatures:
    """Stage-A record of one organ mask (after cleaning). Lengths in mm, volumes in mL."""

    organ_id: int
    organ: str
    voxels: int
    volume_ml: float
    norm_volume: float
    surface_mm2: float
    sphericity: float
    eccentricity: float
    components_before: int
    components_after: int
    centroid_x: float
    centroid_y: float
    centroid_z: float
    bbox_x0: int
    bbox_x1: int
    bbox_y0: int
    bbox_y1: int
    bbox_z0: int
    bbox_z1: int
    partial: bool = False  #: the kept mask reaches within :data:`BORDER_MARGIN` voxels of the volume's border


def touches_border(lo: np.ndarray, hi: np.ndarray, shape: Sequence[int], margin: int = BORDER_MARGIN) -> np.ndarray:
    """Which boxes reach within ``margin`` voxels of the border of a volume of ``shape``.

    ``lo`` / ``hi``: ``(n, 3)`` box starts (inclusive) and ends (exclusive) in voxels. The same rule as
    TotalSegmentator's ``statistics.touches_border`` (any voxel in the first or last ``margin`` slices
    of an axis). Returns ``(n,)`` bool.
    """
    lo, hi = np.asarray(lo).reshape(-1, 3), np.asarray(hi).reshape(-1, 3)
    return ((lo < margin) | (hi > np.asarray(shape) - margin)).any(axis=1)


def _shapes(voxels: np.ndarray, first: np.ndarray, second: np.ndarray, area_mm2: np.ndarray, affine: np.ndarray | None) -> dict[str, np.ndarray]:
    """Volume (mL), sphericity, eccentricity and centroid (mm) of ``n`` masks from voxel counts and index moments.

    ``voxels`` (n,) > 0; ``first``: sums of the voxel indices (n, 3); ``second``: sums of their
    products (n, 3, 3); ``area_mm2`` (n,). Sphericity = pi^(1/3) (6 V)^(2/3) / A; eccentricity =
    sqrt(1 - lambda_min / lambda_max) of the covariance of the voxel centres in mm (the index
    covariance through the affine's 3x3 part).
    """
    m = voxel_matrix(affine)
    volume_ml = voxels * voxel_volume_ml(affine)
    with np.errstate(divide="ignore", invalid="ignore"):
        sphericity = np.where(area_mm2 > 0, np.pi ** (1 / 3) * (6 * volume_ml * 1000.0) ** (2 / 3) / area_mm2, np.nan)
        mean = first / voxels[:, None]
        cov = second / voxels[:, None, None] - mean[:, :, None] * mean[:, None, :]
        lam = np.linalg.eigvalsh(m @ cov @ m.T)  # ascending, per mask
        ecc = np.where((voxels > 1) & (lam[:, -1] > 0), np.sqrt(np.clip(1.0 - lam[:, 0] / lam[:, -1], 0.0, 1.0)), 0.0)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    return {"volume_ml": volume_ml, "sphericity": sphericity, "eccentricity": ecc, "centroid": mean @ aff[:3, :3].T + aff[:3, 3]}


def volume_features(
    labels: np.ndarray,
    affine: np.ndarray | None = None,
    image: np.ndarray | None = None,
    organ_names: Mapping[int, str] = UKBOB_LABELS,
    ranges: Mapping[int, ComponentRange] = UKBOB_COMPONENT_RANGES,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    clean: bool = True,
    copy: bool = True,
) -> tuple[np.ndarray, list[OrganFeatures]]:
    """Stage A for one volume: clean components, then measure every organ present.

    One multi-label connected-components pass gives every component's voxel count, index moments
    and box (:func:`connected_components`); an organ's features are sums over its kept components,
    and one pass over the cleaned map gives all surface areas (:func:`surface_areas_mm2`). No step
    scans the volume once per organ.

    Args:
        labels: integer label map ``(H, W, D)`` (a leading channel of size 1 is accepted).
        affine: 4x4 voxel -> mm matrix of the label map (1 mm isotropic when ``None``).
        image: optional intensities on the same grid, for the body volume (else union of labels).
        organ_names: id -> name table.
        ranges: expected component ranges; ``clean=False`` skips cleaning (counts are still recorded).
        min_fraction: see :func:`clean_components`.
        copy: ``False`` cleans ``labels`` in place when it is already a compact (uint8 for UKBOB)
            array: for a caller that owns the array and needs only the features (the batch runner),
            it saves a copy of the volume.

    Returns:
        ``(cleaned label map, one OrganFeatures per organ present, sorted by id)``.

    Raises:
        :class:`~custom.errors.InputError`: an id of ``labels`` is not a key of ``organ_names``.
    """
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int32)
    hi = None
    if labels.size and labels.dtype != np.uint8:  # a uint8 map needs no range scan: its ids are checked below
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > max(organ_names):
            check_label_ids(labels, organ_names)  # raises, naming the ids
    labels = _compact(labels, hi)
    comps = connected_components(labels)
    check_label_ids(labels, organ_names, present=np.unique(comps.label[1:]))
    keep, counts = _kept(comps, ranges, min_fraction, clean)
    if clean and not keep[1:].all():
        labels = _remove(labels, comps, keep, copy)
    organs = np.array(sorted(counts), dtype=np.int64)
    kept = np.flatnonzero(keep)
    row = np.searchsorted(organs, comps.label[kept])  # each kept component's organ, as a row of the table
    voxels = np.bincount(row, weights=comps.voxels[kept], minlength=len(organs))
    first, second = np.zeros((len(organs), 3)), np.zeros((len(organs), 3, 3))
    np.add.at(first, row, comps.first[kept])
    np.add.at(second, row, comps.second[kept])
    box_lo, box_hi = np.full((len(organs), 3), np.iinfo(np.int64).max), np.zeros((len(organs), 3), dtype=np.int64)
    np.minimum.at(box_lo, row, comps.lo[kept])
    np.maximum.at(box_hi, row, comps.hi[kept])
    # without an image the body is the union of the (cleaned) labels: the kept components' voxels
    body_ml = body_volume_ml(labels, affine, image) if image is not None else float(voxels.sum()) * voxel_volume_ml(affine)
    areas = _surface_areas(labels, voxel_spacing(affine), int(organs.max(initial=0)) + 1)[organs]
    f = _shapes(voxels, first, second, areas, affine)
    partial = touches_border(box_lo, box_hi, labels.shape)
    rows = []
    for k, organ in enumerate(organs.tolist()):
        before, after = counts[organ]
        rows.append(
            OrganFeatures(
                organ_id=organ, organ=organ_names.get(organ, str(organ)), voxels=int(voxels[k]),
                volume_ml=float(f["volume_ml"][k]), norm_volume=float(f["volume_ml"][k]) / body_ml if body_ml > 0 else float("nan"),
                surface_mm2=float(areas[k]), sphericity=float(f["sphericity"][k]), eccentricity=float(f["eccentricity"][k]),
                components_before=before, components_after=after,
                centroid_x=float(f["centroid"][k, 0]), centroid_y=float(f["centroid"][k, 1]), centroid_z=float(f["centroid"][k, 2]),
                bbox_x0=int(box_lo[k, 0]), bbox_x1=int(box_hi[k, 0]), bbox_y0=int(box_lo[k, 1]), bbox_y1=int(box_hi[k, 1]),
                bbox_z0=int(box_lo[k, 2]), bbox_z1=int(box_hi[k, 2]), partial=bool(partial[k]),
            )
        )
    return labels, rows
