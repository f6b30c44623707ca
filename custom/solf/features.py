"""SOLF stage A: per-volume component cleaning and per-organ shape features in physical units.

Plain NumPy/SciPy functions (no MONAI, no torch) so that the batch runner's worker processes stay
light; :mod:`custom.solf.transforms` wraps them as MONAI transforms.

Speed: one :func:`scipy.ndimage.find_objects` pass gives every organ's bounding box; all further
work (connected components, marching cubes, moments) runs on that box only, never on the whole
volume per organ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from scipy import ndimage

from custom.labels import UKBOB_COMPONENT_RANGES, UKBOB_LABELS, ComponentRange

#: a component is kept only if it has at least this fraction of the organ's largest component
DEFAULT_MIN_FRACTION = 0.01
#: 26-connectivity: diagonal neighbours belong to the same component (thin vessels, ribs)
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
FEATURES = ("norm_volume", "sphericity", "eccentricity")


def voxel_matrix(affine: np.ndarray | None) -> np.ndarray:
    """The 3x3 voxel-index -> mm matrix of a 4x4 affine (identity, i.e. 1 mm voxels, when ``None``)."""
    if affine is None:
        return np.eye(3)
    return np.asarray(affine, dtype=np.float64)[:3, :3]


def voxel_spacing(affine: np.ndarray | None) -> np.ndarray:
    """Voxel edge lengths in mm along the three array axes (column norms of the affine)."""
    return np.linalg.norm(voxel_matrix(affine), axis=0)


def check_label_ids(labels: np.ndarray, known_ids: Iterable[int], path: str | None = None) -> None:
    """Raise :class:`~custom.io.InputError` when ``labels`` holds an id outside ``known_ids``.

    Negative ids would be skipped silently by :func:`scipy.ndimage.find_objects`, and a huge id makes
    it allocate one slot per id: both are bad input, reported as one line naming the first few ids.
    """
    known = np.asarray(sorted(set(int(i) for i in known_ids)), dtype=np.int64)
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi <= known[-1]:
        present = np.flatnonzero(np.bincount(labels.ravel().astype(np.int64), minlength=hi + 1))
    else:
        present = np.unique(labels)
    bad = np.setdiff1d(present, known)
    if bad.size:
        from custom.io import InputError  # imported here: workers of the batch runner stay free of MONAI

        raise InputError(
            path, f"label id(s) {bad[:5].tolist()} are outside the taxonomy ({known.size} known ids, {known[0]}..{known[-1]})",
            "remap the labels to the bundle's ids (custom.labels.remap_labels)",
        )


def organ_boxes(labels: np.ndarray, max_id: int | None = None) -> dict[int, tuple[slice, slice, slice]]:
    """Bounding box (tuple of slices) of every non-zero id in ``labels``, in one pass over the volume."""
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int32)
    boxes = ndimage.find_objects(labels, max_label=max_id or 0)
    return {i: box for i, box in enumerate(boxes, 1) if box is not None}


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    comp, n = ndimage.label(mask, structure=_STRUCTURE)
    return comp, int(n)


def clean_components(
    labels: np.ndarray,
    ranges: Mapping[int, ComponentRange] = UKBOB_COMPONENT_RANGES,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    boxes: Mapping[int, tuple[slice, ...]] | None = None,
) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """Remove stray fragments of each organ, following its expected component range.

    For an organ whose range allows ``reduce``, components smaller than ``min_fraction`` of its
    largest component are removed, then at most ``max_count`` of the largest are kept; removed voxels
    become background (0). Organs with ``reduce=False`` (vessels) and ids without a range are kept
    as they are.

    Args:
        labels: integer label map ``(H, W, D)``.
        ranges: organ id -> :class:`~custom.labels.ComponentRange`.
        min_fraction: relative size threshold, in (0, 1].
        boxes: precomputed :func:`organ_boxes` (computed here when ``None``).

    Returns:
        ``(cleaned copy of labels, {organ id: (components before, components after)})``.
    """
    out = np.array(labels, copy=True)
    boxes = organ_boxes(out) if boxes is None else boxes
    counts: dict[int, tuple[int, int]] = {}
    for organ, box in boxes.items():
        rng = ranges.get(organ)
        sub = out[box]
        comp, before = _components(sub == organ)
        if rng is None or not rng.reduce or before <= 1:
            counts[organ] = (before, before)
            continue
        sizes = np.bincount(comp.ravel(), minlength=before + 1)[1:]
        order = np.argsort(sizes)[::-1]
        keep = order[sizes[order] >= min_fraction * sizes[order[0]]][: max(rng.max_count, 1)]
        keep_mask = np.zeros(before + 1, dtype=bool)
        keep_mask[keep + 1] = True
        drop = (comp > 0) & ~keep_mask[comp]
        sub[drop] = 0  # a view into ``out``
        counts[organ] = (before, len(keep))
    return out, counts


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


def surface_area_mm2(mask: np.ndarray, spacing: np.ndarray) -> float:
    """Marching-cubes surface area (mm^2) of a binary mask cropped to its bounding box.

    At level 0.5 on a binary mask the marching-cubes triangles inside each 2x2x2 cube depend only on
    that cube's 8 corners, so the area is ``sum(count of each corner pattern x its area)``: the same
    number as ``skimage.measure.marching_cubes`` + ``mesh_surface_area`` (a test checks it) without
    building the mesh, several times faster. The mask is not smoothed: the staircase of a binary
    mask makes the area ~8% larger than the smooth surface (a voxelised sphere's sphericity is
    0.90-0.93), a bias that barely depends on organ size, so it cancels in SOLF's per-organ cohort
    comparison. Smoothing would push small organs above 1.
    """
    p = np.pad(mask, 1).astype(np.uint8)
    # corner code built one axis at a time: bit k of a cube <-> corner (k & 1, k >> 1 & 1, k >> 2 & 1)
    code = p[:-1] | (p[1:] << 1)
    code = code[:, :-1] | (code[:, 1:] << 2)
    code = code[:, :, :-1] | (code[:, :, 1:] << 4)
    code = code[(code != 0) & (code != 255)]  # only cubes the surface passes through have an area
    return float(np.bincount(code, minlength=256) @ _cube_areas(tuple(float(s) for s in spacing)))


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


def shape_features(mask: np.ndarray, affine: np.ndarray | None, offset: tuple[int, int, int] = (0, 0, 0)) -> dict[str, float]:
    """Volume, surface, sphericity, eccentricity and centroid of one binary mask (a bounding-box crop).

    ``offset`` is the crop's origin in the full volume (so the centroid is in scanner mm).
    Sphericity = pi^(1/3) (6 V)^(2/3) / A; eccentricity = sqrt(1 - lambda_min / lambda_max) of the
    covariance of the voxel centres in mm.
    """
    m = voxel_matrix(affine)
    spacing = np.linalg.norm(m, axis=0)
    # first and second moments from three axis projections (no per-voxel coordinate arrays)
    pxy, pxz = mask.sum(axis=2, dtype=np.int64), mask.sum(axis=1, dtype=np.int64)
    pyz = mask.sum(axis=0, dtype=np.int64)
    px, py, pz = pxy.sum(axis=1), pxy.sum(axis=0), pxz.sum(axis=0)
    lo = np.array([np.flatnonzero(p)[0] for p in (px, py, pz)])
    hi = np.array([np.flatnonzero(p)[-1] + 1 for p in (px, py, pz)])
    n = int(px.sum())
    ix, iy, iz = (np.arange(len(p), dtype=np.float64) for p in (px, py, pz))
    mean = np.array([ix @ px, iy @ py, iz @ pz]) / n
    second = np.empty((3, 3))
    second[0, 0], second[1, 1], second[2, 2] = (ix**2) @ px, (iy**2) @ py, (iz**2) @ pz
    second[0, 1] = second[1, 0] = ix @ pxy @ iy
    second[0, 2] = second[2, 0] = ix @ pxz @ iz
    second[1, 2] = second[2, 1] = iy @ pyz @ iz
    mask = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]  # tight box: cleaning may have shrunk it
    volume_mm3 = n * abs(np.linalg.det(m))
    area = surface_area_mm2(mask, spacing)
    sphericity = np.pi ** (1 / 3) * (6 * volume_mm3) ** (2 / 3) / area if area > 0 else float("nan")
    if n > 1:
        cov_vox = second / n - np.outer(mean, mean)
        lam = np.linalg.eigvalsh(m @ cov_vox @ m.T)
        ecc = float(np.sqrt(min(1.0, max(0.0, 1.0 - lam[0] / lam[-1])))) if lam[-1] > 0 else 0.0
    else:
        ecc = 0.0
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    centroid = aff[:3, :3] @ (mean + np.asarray(offset)) + aff[:3, 3]
    return {
        "voxels": n, "volume_ml": volume_mm3 / 1000.0, "surface_mm2": area, "sphericity": float(sphericity),
        "eccentricity": ecc, "centroid": centroid,
        "bbox": [(int(a + o), int(b + o)) for a, b, o in zip(lo, hi, offset)],
    }


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
    check_label_ids(labels, organ_names)
    boxes = organ_boxes(labels)
    if clean:
        labels, counts = clean_components(labels, ranges, min_fraction, boxes)
    else:
        counts = {i: (c, c) for i, c in ((i, int(ndimage.label(labels[b] == i, _STRUCTURE)[1])) for i, b in boxes.items())}
    body_ml = body_volume_ml(labels, affine, image)
    rows = []
    for organ, box in sorted(boxes.items()):
        mask = labels[box] == organ
        if not mask.any():
            continue
        f = shape_features(mask, affine, tuple(s.start for s in box))
        before, after = counts[organ]
        rows.append(
            OrganFeatures(
                organ_id=organ, organ=organ_names.get(organ, str(organ)), voxels=int(f["voxels"]),
                volume_ml=f["volume_ml"], norm_volume=f["volume_ml"] / body_ml if body_ml > 0 else float("nan"),
                surface_mm2=f["surface_mm2"], sphericity=f["sphericity"], eccentricity=f["eccentricity"],
                components_before=before, components_after=after,
                centroid_x=float(f["centroid"][0]), centroid_y=float(f["centroid"][1]), centroid_z=float(f["centroid"][2]),
                bbox_x0=f["bbox"][0][0], bbox_x1=f["bbox"][0][1], bbox_y0=f["bbox"][1][0], bbox_y1=f["bbox"][1][1],
                bbox_z0=f["bbox"][2][0], bbox_z1=f["bbox"][2][1],
            )
        )
    return labels, rows
