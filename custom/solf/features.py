"""SOLF stage A: per-volume component cleaning and per-organ shape features in physical units.

Plain NumPy/SciPy functions (no MONAI, no torch) so that the batch runner's worker processes stay
light; :mod:`custom.solf.transforms` wraps them as MONAI transforms.

Speed: one multi-label connected-components pass (``cc3d``) labels every organ's components; their
voxel counts, index moments and boxes come from runs of voxels along the contiguous axis; one more
pass over the cubes that hold any surface gives every organ's marching-cubes area. Nothing scans the
volume once per organ (body-wide fat and muscle labels span the whole volume).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from custom.labels import UKBOB_COMPONENT_RANGES, UKBOB_LABELS, ComponentRange

#: a component is kept only if it has at least this fraction of the organ's largest component
DEFAULT_MIN_FRACTION = 0.01
FEATURES = ("norm_volume", "sphericity", "eccentricity")


def voxel_matrix(affine: np.ndarray | None) -> np.ndarray:
    """The 3x3 voxel-index -> mm matrix of a 4x4 affine (identity, i.e. 1 mm voxels, when ``None``)."""
    if affine is None:
        return np.eye(3)
    return np.asarray(affine, dtype=np.float64)[:3, :3]


def voxel_spacing(affine: np.ndarray | None) -> np.ndarray:
    """Voxel edge lengths in mm along the three array axes (column norms of the affine)."""
    return np.linalg.norm(voxel_matrix(affine), axis=0)


def check_label_ids(
    labels: np.ndarray, known_ids: Iterable[int], path: str | None = None, present: np.ndarray | None = None
) -> None:
    """Raise :class:`~custom.io.InputError` when ``labels`` holds an id outside ``known_ids``.

    Negative or huge ids are bad input (a huge id would also make per-id tables huge): reported as
    one line naming the first few. ``present``: the ids already known to occur (e.g. the labels of
    the connected components), which saves a scan of the volume when the id range is valid.
    """
    known = np.asarray(sorted(set(int(i) for i in known_ids)), dtype=np.int64)
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > known[-1]:
        present = np.unique(labels)
    elif present is None:
        present = np.flatnonzero(np.bincount(labels.ravel().astype(np.int64), minlength=hi + 1))
    bad = np.setdiff1d(present, known)
    if bad.size:
        from custom.io import InputError  # imported here: workers of the batch runner stay free of MONAI

        raise InputError(
            path, f"label id(s) {bad[:5].tolist()} are outside the taxonomy ({known.size} known ids, {known[0]}..{known[-1]})",
            "remap the labels to the bundle's ids (custom.labels.remap_labels)",
        )


def _compact(labels: np.ndarray) -> np.ndarray:
    """``labels`` in the smallest unsigned dtype that holds its ids (ids already checked >= 0)."""
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

    cc: np.ndarray  #: component id of every voxel, 0 = background
    label: np.ndarray  #: (n + 1,) organ id of each component
    voxels: np.ndarray  #: (n + 1,) voxel count
    first: np.ndarray  #: (n + 1, 3) sums of the voxel indices
    second: np.ndarray  #: (n + 1, 3, 3) sums of products of the voxel indices
    lo: np.ndarray  #: (n + 1, 3) bounding box start (inclusive)
    hi: np.ndarray  #: (n + 1, 3) bounding box end (exclusive)

    def box(self, ids: Iterable[int]) -> tuple[slice, slice, slice]:
        """The bounding box (slices) of the union of components ``ids``."""
        ids = np.asarray(list(ids))
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo[ids].min(axis=0), self.hi[ids].max(axis=0)))


def connected_components(labels: np.ndarray) -> Components:
    """Label every organ's components in one pass (``cc3d``) and measure them from runs of voxels.

    The label map is cut into runs along its contiguous axis (a run = consecutive voxels of one id
    in one row, so of one component); each run's voxel count, index sums and products have closed
    forms, so the moments and boxes of all components come from a few array operations over the runs
    (O(surface), not O(volume)) instead of one scan of the volume per organ.

    Args:
        labels: label map ``(H, W, D)`` of non-negative ids (any integer dtype, any memory order).
    """
    import cc3d

    cc, n = cc3d.connected_components(labels, connectivity=26, return_N=True)
    # runs are found on the (narrower, faster to compare) label map: a run of one id lies in one component
    view, axes = _c_view(labels)
    cc_view = cc.T if axes == (2, 1, 0) else cc
    flat, length = view.reshape(-1), view.shape[2]
    start = np.empty(flat.size, dtype=bool)
    if flat.size:
        start[0] = True
        np.not_equal(flat[1:], flat[:-1], out=start[1:])
        start[::length] = True  # a run never continues onto the next row
    starts = np.flatnonzero(start)
    runs = np.diff(starts, append=flat.size).astype(np.float64)
    run_label = flat[starts]
    fg = run_label != 0
    starts, runs = starts[fg], runs[fg]
    comp = cc_view.reshape(-1)[starts].astype(np.int64)
    label = np.zeros(n + 1, dtype=np.int64)
    label[comp] = run_label[fg]
    # view coordinates of each run: (a, b) fixed, c .. c + runs - 1
    c = (starts % length).astype(np.float64)
    ab = starts // length
    a, b = (ab // view.shape[1]).astype(np.float64), (ab % view.shape[1]).astype(np.float64)
    sum_c = runs * c + runs * (runs - 1) / 2
    sum_cc = runs * c * c + c * runs * (runs - 1) + (runs - 1) * runs * (2 * runs - 1) / 6
    per_run = {
        (0,): a * runs, (1,): b * runs, (2,): sum_c,
        (0, 0): a * a * runs, (1, 1): b * b * runs, (2, 2): sum_cc,
        (0, 1): a * b * runs, (0, 2): a * sum_c, (1, 2): b * sum_c,
    }
    count = np.bincount(comp, weights=runs, minlength=n + 1)
    first, second = np.zeros((n + 1, 3)), np.zeros((n + 1, 3, 3))
    for key, w in per_run.items():
        total = np.bincount(comp, weights=w, minlength=n + 1)
        if len(key) == 1:
            first[:, axes[key[0]]] = total
        else:
            i, j = axes[key[0]], axes[key[1]]
            second[:, i, j] = second[:, j, i] = total
    lo = np.full((n + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.zeros((n + 1, 3), dtype=np.int64)
    ends = c + runs  # exclusive
    for view_axis, (begin, end) in enumerate(((a, a + 1), (b, b + 1), (c, ends))):
        np.minimum.at(lo[:, axes[view_axis]], comp, begin.astype(np.int64))
        np.maximum.at(hi[:, axes[view_axis]], comp, end.astype(np.int64))
    return Components(cc, label, count.astype(np.int64), first, second, lo, hi)


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


def _remove(labels: np.ndarray, comps: Components, keep: np.ndarray) -> np.ndarray:
    """A copy of ``labels`` with the components not in ``keep`` set to 0 (each on its own bounding box)."""
    out = np.array(labels, copy=True)
    for cid in np.flatnonzero(~keep[1:]) + 1:
        box = comps.box([cid])
        sub = out[box]  # a view into ``out``
        sub[comps.cc[box] == cid] = 0
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
    voxel_ml = abs(np.linalg.det(voxel_matrix(affine))) / 1000.0
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
    view, axes = _c_view(labels)
    flat = np.ascontiguousarray(np.pad(view, 1)).reshape(-1)  # background around the volume closes every surface
    s0, s1 = (view.shape[1] + 2) * (view.shape[2] + 2), view.shape[2] + 2
    offsets = [(k & 1) * s0 + (k >> 1 & 1) * s1 + (k >> 2 & 1) for k in range(8)]  # corner k of a cube
    table = _cube_areas(tuple(float(spacing[ax]) for ax in axes))
    n_ids = int(flat.max(initial=0)) + 1
    counts = np.zeros(n_ids * 256, dtype=np.int64)
    n_cubes = flat.size - offsets[7]  # a cube is indexed by the flat index of its corner 0
    for start in range(0, n_cubes, _CHUNK):  # chunks small enough for the CPU cache
        counts += _mixed_cube_patterns(flat, start, min(start + _CHUNK, n_cubes), offsets, n_ids)
    return counts.reshape(n_ids, 256) @ table


#: cubes per chunk of :func:`surface_areas_mm2` (a few hundred kB of uint8 temporaries: stays in L2)
_CHUNK = 1 << 18


def _mixed_cube_patterns(flat: np.ndarray, start: int, stop: int, offsets: list[int], n_ids: int) -> np.ndarray:
    """Counts of (id, corner pattern) over the cubes ``start:stop`` of a padded flat label map, ``(n_ids * 256,)``.

    Cubes that wrap around a row end hold only padding, so they are never mixed and never counted.
    """
    hi = lo = flat[start : stop + offsets[7]]
    for step in (offsets[1], offsets[2], offsets[4]):  # max and min over each cube, one axis at a time
        hi, lo = np.maximum(hi[:-step], hi[step:]), np.minimum(lo[:-step], lo[step:])
    mixed = np.flatnonzero(hi != lo)
    hi, lo = hi[mixed], lo[mixed]
    mixed += start
    corners = [flat[off:][mixed] for off in offsets]
    counts = np.zeros(n_ids * 256, dtype=np.int64)

    def add(ids: np.ndarray, codes: np.ndarray) -> None:
        counts[:] += np.bincount(ids.astype(np.int64) * 256 + codes, minlength=n_ids * 256)

    # most cubes hold two ids (hi and lo): the pattern of lo is the complement of that of hi
    code = np.zeros(len(mixed), dtype=np.uint8)
    two = np.ones(len(mixed), dtype=bool)
    for j, corner in enumerate(corners):
        is_hi = corner == hi
        code |= is_hi.view(np.uint8) << j
        two &= is_hi | (corner == lo)
    add(hi[two], code[two])
    with_lo = two & (lo != 0)
    add(lo[with_lo], ~code[with_lo])
    # three or more ids: each id present at a corner gets its own pattern, counted at its first corner
    corners = [c[~two] for c in corners]
    for k in range(8):
        first = corners[k] != 0
        code = np.zeros(len(first), dtype=np.uint8)
        for j in range(8):
            same = corners[j] == corners[k]
            code |= same.view(np.uint8) << j
            if j < k:
                first &= ~same
        add(corners[k][first], code[first])
    return counts


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


def _shape(voxels: int, first: np.ndarray, second: np.ndarray, area_mm2: float, affine: np.ndarray | None) -> dict[str, Any]:
    """Volume, sphericity, eccentricity and centroid of a mask from its voxel count and index moments.

    ``first``: sums of the voxel indices (3,); ``second``: sums of their products (3, 3).
    Sphericity = pi^(1/3) (6 V)^(2/3) / A; eccentricity = sqrt(1 - lambda_min / lambda_max) of the
    covariance of the voxel centres in mm (the index covariance through the affine's 3x3 part).
    """
    m = voxel_matrix(affine)
    volume_mm3 = voxels * abs(np.linalg.det(m))
    sphericity = np.pi ** (1 / 3) * (6 * volume_mm3) ** (2 / 3) / area_mm2 if area_mm2 > 0 else float("nan")
    mean = first / voxels
    ecc = 0.0
    if voxels > 1:
        lam = np.linalg.eigvalsh(m @ (second / voxels - np.outer(mean, mean)) @ m.T)
        ecc = float(np.sqrt(min(1.0, max(0.0, 1.0 - lam[0] / lam[-1])))) if lam[-1] > 0 else 0.0
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    return {"volume_ml": volume_mm3 / 1000.0, "sphericity": float(sphericity), "eccentricity": ecc, "centroid": aff[:3, :3] @ mean + aff[:3, 3]}


def volume_features(
    labels: np.ndarray,
    affine: np.ndarray | None = None,
    image: np.ndarray | None = None,
    organ_names: Mapping[int, str] = UKBOB_LABELS,
    ranges: Mapping[int, ComponentRange] = UKBOB_COMPONENT_RANGES,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    clean: bool = True,
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

    Returns:
        ``(cleaned label map, one OrganFeatures per organ present, sorted by id)``.

    Raises:
        :class:`~custom.io.InputError`: an id of ``labels`` is not a key of ``organ_names``.
    """
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int32)
    known = max(organ_names)
    if labels.size and (labels.min() < 0 or labels.max() > known):
        check_label_ids(labels, organ_names)  # raises, naming the ids
    labels = _compact(labels)
    comps = connected_components(labels)
    check_label_ids(labels, organ_names, present=np.unique(comps.label[1:]))
    keep, counts = _kept(comps, ranges, min_fraction, clean)
    if clean and not keep[1:].all():
        labels = _remove(labels, comps, keep)
    kept = np.flatnonzero(keep)
    body_ml = body_volume_ml(labels, affine, image)
    areas = surface_areas_mm2(labels, voxel_spacing(affine))
    rows = []
    for organ in sorted(counts):
        ids = kept[comps.label[kept] == organ]
        n = int(comps.voxels[ids].sum())
        f = _shape(n, comps.first[ids].sum(axis=0), comps.second[ids].sum(axis=0), float(areas[organ]), affine)
        box = comps.box(ids)
        before, after = counts[organ]
        rows.append(
            OrganFeatures(
                organ_id=organ, organ=organ_names.get(organ, str(organ)), voxels=n,
                volume_ml=f["volume_ml"], norm_volume=f["volume_ml"] / body_ml if body_ml > 0 else float("nan"),
                surface_mm2=float(areas[organ]), sphericity=f["sphericity"], eccentricity=f["eccentricity"],
                components_before=before, components_after=after,
                centroid_x=float(f["centroid"][0]), centroid_y=float(f["centroid"][1]), centroid_z=float(f["centroid"][2]),
                bbox_x0=box[0].start, bbox_x1=box[0].stop, bbox_y0=box[1].start, bbox_y1=box[1].stop,
                bbox_z0=box[2].start, bbox_z1=box[2].stop,
            )
        )
    return labels, rows
