"""A labelled cohort for testing and benchmarking SOLF: real anatomy, realistic variation, known errors.

Public UKBOB labels cannot be downloaded here, so a cohort is made from one real TotalSegmentator
label map (``ukbob_sample``, UKBOB ids): every subject is the real map warped by a random global
affine (body size and pose: per-axis scale, rotation, shift) and a smooth random displacement field
(organ shape and size vary locally), resampled with nearest-neighbour interpolation. Then, at a known
rate, one organ mask per subject is corrupted with an error of known kind (:data:`ERROR_KINDS`).

:func:`make_subject` is deterministic in its seed, so tests and benchmarks regenerate the same cohort.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from custom.atomic import atomic_path, atomic_write_text
from custom.labels import UKBOB_COMPONENT_RANGES, UKBOB_LR_PAIRS, UKBOB_LUNG_LOBE_IDS

ERROR_KINDS = ("spill", "truncated", "merged", "lr_swap", "missing", "over", "under")
_PARTNER = {**{a: b for a, b in UKBOB_LR_PAIRS}, **{b: a for a, b in UKBOB_LR_PAIRS}}


@dataclass(frozen=True)
class Injected:
    """One injected error: ``organs`` are the masks that are wrong afterwards (empty for ``missing``)."""

    kind: str
    organ_id: int
    organs: tuple[int, ...]


def warp(labels: np.ndarray, rng: np.random.Generator, scale_sd: float = 0.06, rot_deg: float = 6.0,
         shift_vox: float = 3.0, elastic_vox: float = 2.0, elastic_grid: int = 5) -> np.ndarray:
    """Nearest-neighbour resampling of ``labels`` through a random affine plus a smooth displacement.

    Scale ~ N(1, scale_sd) per axis, rotation ~ U(-rot_deg, rot_deg) about the last axis, shift ~
    N(0, shift_vox) voxels, displacement ~ N(0, elastic_vox) voxels on a coarse ``elastic_grid``^3 grid
    upsampled trilinearly.
    """
    shape = np.array(labels.shape)
    centre = (shape - 1) / 2
    scale = rng.normal(1.0, scale_sd, 3)
    a = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    inv = np.linalg.inv(rot @ np.diag(scale))
    grid = np.indices(labels.shape, dtype=np.float32).reshape(3, -1) - centre[:, None].astype(np.float32)
    src = inv.astype(np.float32) @ grid + (centre + rng.normal(0, shift_vox, 3))[:, None].astype(np.float32)
    for axis in range(3):
        coarse = rng.normal(0, elastic_vox, (elastic_grid,) * 3)
        field = ndimage.zoom(coarse, shape / elastic_grid, order=1, prefilter=False)[: shape[0], : shape[1], : shape[2]]
        src[axis] += field.reshape(-1).astype(np.float32)
    out = ndimage.map_coordinates(labels, src, order=0, mode="constant", cval=0)
    return out.reshape(labels.shape).astype(labels.dtype)


def eligible_organs(labels: np.ndarray, min_voxels: int = 300) -> list[int]:
    """Single-component solid organs (no lungs) with at least ``min_voxels``: candidates for errors."""
    counts = np.bincount(labels.ravel(), minlength=256)
    return [
        i for i, r in UKBOB_COMPONENT_RANGES.items()
        if r.reduce and r.max_count == 1 and i not in UKBOB_LUNG_LOBE_IDS and counts[i] >= min_voxels
    ]


def _ball(shape: Sequence[int], centre: np.ndarray, radius: float) -> tuple[tuple[slice, ...], np.ndarray]:
    lo = np.maximum(np.floor(centre - radius).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radius).astype(int) + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    idx = np.indices(hi - lo).reshape(3, -1).T + lo
    inside = (((idx - centre) ** 2).sum(1) <= radius**2).reshape(hi - lo)
    return box, inside


def inject(labels: np.ndarray, kind: str, organ: int, rng: np.random.Generator) -> tuple[np.ndarray, Injected]:
    """Corrupt ``organ`` in a copy of ``labels`` with an error of ``kind``; returns (labels, record)."""
    out = labels.copy()
    mask = out == organ
    n = int(mask.sum())
    idx = np.argwhere(mask)
    centroid = idx.mean(0)
    if kind == "spill":  # a blob attached to the organ leaks into the neighbouring tissue
        boundary = np.argwhere(mask & ~ndimage.binary_erosion(mask))
        p = boundary[rng.integers(len(boundary))].astype(float)
        d = (p - centroid) / (np.linalg.norm(p - centroid) + 1e-6)
        r = (3 * rng.uniform(0.5, 0.9) * n / (4 * np.pi)) ** (1 / 3)
        box, inside = _ball(out.shape, p + d * 0.8 * r, r)
        out[box][inside] = organ
        return out, Injected(kind, organ, (organ,))
    if kind == "truncated":  # the organ is cut by a plane across its long axis
        cov = np.cov(idx.T)
        axis = np.linalg.eigh(cov)[1][:, -1]
        proj = (idx - centroid) @ axis
        cut = np.quantile(proj, rng.uniform(0.35, 0.55))
        gone = idx[proj > cut]
        out[tuple(gone.T)] = 0
        return out, Injected(kind, organ, (organ,))
    if kind == "merged":  # the largest touching neighbour is labelled as this organ
        shell = ndimage.binary_dilation(mask, iterations=2) & ~mask
        near = np.bincount(out[shell].ravel(), minlength=256)
        near[0] = 0
        for big in (65, 66, 67, 18):  # diffuse tissues: merging them is a different failure
            near[big] = 0
        other = int(np.argmax(near))
        if near[other] == 0:
            raise ValueError("no neighbour to merge")
        out[out == other] = organ
        return out, Injected(kind, organ, (organ,))
    if kind == "lr_swap":
        other = _PARTNER.get(organ)
        if other is None or not (out == other).any():
            raise ValueError("no left/right partner")
        partner = out == other
        out[mask], out[partner] = other, organ
        return out, Injected(kind, organ, (organ, other))
    if kind == "missing":
        out[mask] = 0
        return out, Injected(kind, organ, ())
    if kind == "over":
        target = n * rng.uniform(1.8, 2.6)
        grown = mask
        for _ in range(6):
            grown = ndimage.binary_dilation(grown)
            if grown.sum() >= target:
                break
        out[grown] = organ
        return out, Injected(kind, organ, (organ,))
    if kind == "under":
        target = n * rng.uniform(0.25, 0.45)
        shrunk = mask
        for _ in range(6):
            nxt = ndimage.binary_erosion(shrunk)
            if nxt.sum() < 20:
                break
            shrunk = nxt
            if shrunk.sum() <= target:
                break
        out[mask & ~shrunk] = 0
        return out, Injected(kind, organ, (organ,))
    raise ValueError(f"unknown error kind {kind!r}; choose from {ERROR_KINDS}")


def make_subject(base: np.ndarray, seed: int, error_rate: float = 0.0, kinds: Sequence[str] = ERROR_KINDS) -> tuple[np.ndarray, Injected | None]:
    """One cohort member: the warped base map, with one injected error with probability ``error_rate``."""
    rng = np.random.default_rng(seed)
    labels = warp(base, rng)
    if rng.random() >= error_rate:
        return labels, None
    kind = str(rng.choice(list(kinds)))
    organs = eligible_organs(labels)
    if kind == "lr_swap":
        organs = [o for o in organs if o in _PARTNER and _PARTNER[o] in organs]
    for organ in rng.permutation(organs):
        try:
            return inject(labels, kind, int(organ), rng)
        except ValueError:
            continue
    return labels, None


def write_cohort(base_file: str | Path, folder: str | Path, n: int, error_rate: float = 0.2, seed: int = 0,
                 kinds: Sequence[str] = ERROR_KINDS) -> tuple[Path, list[dict]]:
    """Write ``n`` subjects as ``labels/sub_XXX.nii.gz`` plus ``dataset.json``; returns (datalist, truth).

    ``truth`` has one dict per subject: ``volume`` (datalist path), ``kind``, ``organ_id``, ``organs``.
    """
    import json

    import nibabel as nib

    base_img = nib.load(str(base_file))
    base = np.asarray(base_img.dataobj).astype(np.uint8)
    folder = Path(folder)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    truth, entries = [], []
    for i in range(n):
        labels, inj = make_subject(base, seed * 100_003 + i, error_rate, kinds)
        rel = f"labels/sub_{i:03d}.nii.gz"
        with atomic_path(folder / rel) as tmp:  # a killed run leaves no truncated subject
            nib.save(nib.Nifti1Image(labels, base_img.affine), str(tmp))
        entries.append({"label": rel})
        truth.append({"volume": rel, "kind": inj.kind if inj else None, "organ_id": inj.organ_id if inj else None,
                      "organs": list(inj.organs) if inj else []})
    datalist = folder / "dataset.json"
    atomic_write_text(datalist, json.dumps({"name": "solf_cohort", "training": entries}, indent=1))
    return datalist, truth
