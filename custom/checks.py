"""Input checks on paths, arrays and headers (NumPy only: SOLF workers import this module).

Each check returns nothing (or its input) and raises :class:`~custom.errors.InputError` with one
line that names the file, the problem and the fix. Arrays may be NumPy arrays, torch tensors or
MONAI MetaTensors (read through ``np.asarray``); the file name then comes from the MetaTensor's
metadata (:func:`source_name`). MONAI transforms over these checks live in :mod:`custom.transforms`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from custom.errors import InputError


def check_readable(path: str | os.PathLike) -> Path:
    """Existence, type and non-emptiness of an input path (a file or a DICOM folder); returns it as a Path."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path")
    if path.is_dir():
        if not any(path.iterdir()):
            raise InputError(path, "the folder is empty", "give a NIfTI file or a folder with a DICOM series")
        return path
    if path.stat().st_size == 0:
        raise InputError(path, "the file is empty (0 bytes)", "re-export or re-download it")
    return path


#: file endings of single-file images; the case name is the file name without them
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".mha", ".mhd")


def case_name(name: str | os.PathLike) -> str:
    """``/data/ct_01.nii.gz`` -> ``ct_01``; a DICOM series folder (``/data/ct_01/``) -> ``ct_01``."""
    base = os.path.basename(str(name).rstrip("/"))
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):  # .nii.gz before .nii
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def source_names(obj: Any) -> list[str]:
    """The source file names in a MONAI metadata dict (``meta["filename_or_obj"]``), or in ``obj.meta``.

    ``obj``: a MetaTensor, a metadata mapping or anything else (-> ``[]``). A batch holds one name per
    item, so the result is a list (empty when there is no name).
    """
    meta = obj if isinstance(obj, Mapping) else getattr(obj, "meta", None)
    names = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    names = names if isinstance(names, (list, tuple)) else [names]
    return [str(n) for n in names if n is not None and str(n)]


def source_name(obj: Any) -> str | None:
    """The first of :func:`source_names` (``None`` when there is none): the file to name in an error."""
    names = source_names(obj)
    return names[0] if names else None


def as_numpy(x: Any) -> np.ndarray:
    """A NumPy view of an array, tensor or MetaTensor (moved to the CPU; no copy when already NumPy)."""
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)


def _describe(known: np.ndarray) -> str:
    lo, hi = int(known[0]), int(known[-1])
    return f"{lo}..{hi}" if known.size == hi - lo + 1 else f"{known.size} known ids, {lo}..{hi}"


def check_label_ids(
    labels: Any, known_ids: Iterable[int], path: str | None = None, present: np.ndarray | None = None,
    fix: str = "remap the labels to the bundle's ids (custom.labels.remap_labels)",
) -> None:
    """Raise :class:`InputError` when ``labels`` holds an id outside ``known_ids`` (the one label id check).

    Args:
        labels: integer label map of any shape (array, tensor or MetaTensor; the file name comes from
            its metadata when ``path`` is ``None``). Non-integer values are reported as such.
        known_ids: the ids the taxonomy allows (background 0 included when it is allowed).
        present: the ids known to occur (e.g. the labels of the connected components), which saves
            every scan of the volume.
        fix: the advice of the one-line error.

    Negative or huge ids are bad input (a huge id would also make per-id tables huge). Ids below the
    largest known id that the taxonomy skips are looked for one compare each when they are few, so a
    valid map costs one min/max pass.
    """
    path = path or source_name(labels)
    arr = as_numpy(labels)
    known = np.asarray(sorted({int(i) for i in known_ids}), dtype=np.int64)
    if arr.size == 0:
        return
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and np.array_equal(arr, np.rint(arr))):
        raise InputError(path, "the label map holds non-integer values", "save labels with an integer dtype (nearest-neighbour resampling)")
    if present is None:
        lo, hi = int(arr.min()), int(arr.max())
        holes = np.setdiff1d(np.arange(max(lo, 0), hi + 1), known) if lo >= 0 and hi <= known[-1] else None
        if holes is None:
            present = np.unique(arr).astype(np.int64)
        elif holes.size <= 8:  # one compare per skipped id, not a histogram of the whole volume
            present = np.asarray([h for h in holes if (arr == h).any()], dtype=np.int64)
        else:
            present = np.flatnonzero(np.bincount(arr.ravel().astype(np.int64), minlength=hi + 1))
    bad = np.setdiff1d(present, known)
    if bad.size:
        raise InputError(path, f"label id(s) {bad[:5].tolist()} are outside the taxonomy ({_describe(known)})", fix)


def check_label(label: Any, num_classes: int, extra_ids: Sequence[int] = (), path: str | None = None) -> None:
    """Raise :class:`InputError` unless ``label`` holds only integer ids ``0..num_classes-1`` (or ``extra_ids``).

    ``label``: channel-first ``(1, H, W, D)`` array or tensor (the file name comes from its metadata).
    """
    check_label_ids(label, [*range(num_classes), *extra_ids], path, fix="remap the labels to this bundle's ids")


def check_image(image: Any, path: str | None = None, channels: int | None = None, allow_constant: bool = False) -> None:
    """Raise :class:`InputError` for an image that must not reach a network.

    Args:
        image: channel-first array or tensor ``(C, H, W, D)``.
        path: file name for the message (taken from MONAI metadata when ``None``).
        channels: the channel count the model expects (``None``: any).
        allow_constant: accept a constant image (labels may be; images should not be).
    """
    path = path or source_name(image)
    arr = as_numpy(image)
    if arr.ndim != 4:
        raise InputError(path, f"expected a 3D volume (channel-first 4D after loading), got shape {tuple(arr.shape)}", "give a 3D image")
    if channels is not None and arr.shape[0] != channels:
        raise InputError(
            path, f"the image has {arr.shape[0]} channel(s), the model needs {channels}", f"give a {channels}-channel image"
        )
    if arr.size == 0:
        raise InputError(path, "the image has no voxels", "give a non-empty image")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise InputError(path, f"the voxels are not numbers (dtype {arr.dtype})", "give a numeric image")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InputError(path, f"{bad} voxel(s) are NaN or infinite", "fix or mask them before segmenting")
    if not allow_constant and arr.min() == arr.max():
        raise InputError(path, f"the image is constant (every voxel = {arr.flat[0]})", "check the export; it holds no anatomy")


def check_same_grid(image: Any, label: Any, atol_mm: float = 1e-3) -> None:
    """Raise :class:`InputError` (naming the label file) when ``label`` is not on ``image``'s voxel grid.

    Both channel-first arrays as loaded (before any resampling), with an ``affine`` attribute
    (MetaTensor; identity when absent): same spatial shape and the same voxel-to-mm affine within ``atol_mm``.
    """
    path = source_name(label)
    shape_i, shape_l = tuple(image.shape[1:]), tuple(label.shape[1:])
    aff_i = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
    aff_l = np.asarray(getattr(label, "affine", np.eye(4)), dtype=np.float64)
    if shape_i != shape_l or not np.allclose(aff_i, aff_l, atol=atol_mm):
        sp_i, sp_l = (np.round(np.linalg.norm(a[:3, :3], axis=0), 3).tolist() for a in (aff_i, aff_l))
        raise InputError(
            path, f"the label grid (shape {shape_l}, spacing {sp_l} mm) differs from the image's (shape {shape_i}, spacing {sp_i} mm)",
            "resample the label onto its image (nearest neighbour) or pair the right files",
        )


def check_affine(affine: np.ndarray, path: str | None = None) -> None:
    """Raise :class:`InputError` for a voxel-to-mm matrix with zero, NaN or infinite spacing."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "the voxel-to-mm matrix is degenerate (zero or NaN spacing)", "repair the header's pixdim/sform")
