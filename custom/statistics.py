"""Per-organ statistics in TotalSegmentator's ``statistics.json`` format, plus this project's fields.

TotalSegmentator (``totalsegmentator/statistics.py``, ``get_basic_statistics``) writes one entry per
class of its taxonomy, present or not: ``{"<organ>": {"volume": mm^3, "intensity": mean image value},
...}``, with ``volume`` and ``intensity`` set to 0.0 for an organ whose mask reaches within 3 voxels of
the volume's border (cut by the field of view) and for an absent one. :func:`organ_statistics` writes
the same keys, units and values (a test compares it with TotalSegmentator's own function read from
its 2.18.0 sdist), so scripts written for TotalSegmentator read our files unchanged, and adds beside
them: ``volume_ml`` (measured even when the organ is partial), ``voxels``, ``partial`` (the border
flag) and ``qc`` (the per-scan QC verdict of :mod:`custom.solf.qc`, ``None`` without QC); for a
multi-channel image also ``intensity_channels`` (the mean per channel; ``intensity`` is channel 0).

One difference by design: TotalSegmentator casts the image to int16 before averaging (it is made
for CT in HU); here the image is averaged as it is, so MR and float images keep their decimals (the
values agree on integer CT).

NumPy only: one ``bincount`` per channel gives every organ's voxel count and intensity sum.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from custom.atomic import atomic_write_text
from custom.solf.features import BORDER_MARGIN, voxel_spacing


def border_ids(labels: np.ndarray, margin: int = BORDER_MARGIN) -> set[int]:
    """Ids with a voxel in the first or last ``margin`` slices of any axis (TotalSegmentator's
    ``touches_border``, for all ids at once)."""
    found: set[int] = set()
    for axis in range(3):
        for sl in (slice(0, margin), slice(-margin, None)):
            idx = [slice(None)] * 3
            idx[axis] = sl
            found |= set(np.unique(labels[tuple(idx)]).tolist())
    return found - {0}


def organ_statistics(
    labels: np.ndarray,
    image: np.ndarray | None,
    affine: np.ndarray | None,
    names: Mapping[int, str],
    exclude_masks_at_border: bool = True,
    qc: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Statistics of every organ of ``names`` (present or not) in one label map.

    Args:
        labels: integer label map ``(H, W, D)`` (a leading channel of 1 is accepted).
        image: intensities on the same grid, ``(H, W, D)`` or channel-first ``(C, H, W, D)``; ``None``
            gives ``intensity`` 0.0.
        affine: 4x4 voxel -> mm matrix (voxel volume = product of the voxel edge lengths, as
            TotalSegmentator's product of the header zooms).
        names: id -> organ name of the label map's taxonomy; id 0 and names ``background`` /
            ``unused`` are skipped. The output keeps this order.
        exclude_masks_at_border: TotalSegmentator's switch: ``volume`` and ``intensity`` are 0.0 for
            an organ within 3 voxels of the border (``partial`` is reported either way).
        qc: a per-scan QC dict (:func:`custom.solf.qc.scan_qc`); its verdicts fill ``qc``.

    Returns:
        ``{organ: {"volume": mm^3, "intensity": mean, "volume_ml", "voxels", "partial", "qc"}}``,
        plain Python numbers (JSON-ready); ``intensity`` rounded to 5 decimals as TotalSegmentator does.
    """
    lab = np.asarray(labels)
    if lab.ndim == 4 and lab.shape[0] == 1:
        lab = lab[0]
    lab = lab.astype(np.int64, copy=False)
    n = max(int(lab.max(initial=0)), max(names, default=0)) + 1
    flat = lab.ravel()
    voxels = np.bincount(flat, minlength=n)
    channels = []
    if image is not None:
        img = np.asarray(image, dtype=np.float64)
        img = img[None] if img.ndim == 3 else img
        if img.shape[1:] != lab.shape:
            raise ValueError(f"label grid {lab.shape} differs from the image grid {img.shape[1:]}")
        channels = [np.bincount(flat, weights=c.ravel(), minlength=n) for c in img]
    vox_mm3 = float(np.prod(voxel_spacing(affine)))
    border = border_ids(lab)
    verdicts = {o.get("label_id"): o.get("verdict") for o in (qc or {}).get("organs", {}).values()}
    out: dict[str, dict[str, Any]] = {}
    for i, name in names.items():
        if i == 0 or name in ("background", "unused"):
            continue
        count = int(voxels[i]) if i < n else 0
        partial = i in border
        means = [round(float(s[i] / count), 5) if count else 0.0 for s in channels]
        zeroed = partial and exclude_masks_at_border
        entry: dict[str, Any] = {
            "volume": 0.0 if zeroed else count * vox_mm3,
            "intensity": 0.0 if zeroed or not means else means[0],
            "volume_ml": round(count * vox_mm3 / 1000.0, 4),
            "voxels": count,
            "partial": partial,
            "qc": verdicts.get(i),
        }
        if len(means) > 1:
            entry["intensity_channels"] = [0.0] * len(means) if zeroed else means
        out[name] = entry
    return out


def write_statistics(path: str | os.PathLike, stats: Mapping[str, Any]) -> Path:
    """Write ``stats`` as ``statistics.json`` (indent 4, as TotalSegmentator), atomically."""
    return atomic_write_text(path, json.dumps(stats, indent=4) + "\n")
