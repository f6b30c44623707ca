"""SOLF as MONAI transforms, for ``train.json`` pipelines (array and dictionary versions).

- :class:`OrganComponentFilter` / ``d``: stage-A component cleaning of a label map.
- :class:`SOLFFeatures` / ``d``: stage-A features of a label map (a list of per-organ records).
- :class:`ApplySOLFDecision` / ``d``: stage-B decisions (``decisions.csv``) applied on the fly:
  rejected organs become the ignore value (or background).
- :class:`SOLFQC` / ``d``: per-scan QC of a predicted label map against a cohort reference
  (:mod:`custom.solf.qc`), for a ``qc`` step in a bundle's ``inference.json`` postprocessing.

Label maps go in channel-first ``(1, H, W, D)`` (as after ``EnsureChannelFirstd``), as MetaTensor or
NumPy; spacing comes from the MetaTensor's affine (or ``affine=``). Outputs keep type and metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import pandas as pd
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type

from custom.atomic import atomic_write_text
from custom.checks import case_name, check_label_ids, source_name
from custom.errors import InputError
from custom.labels import IGNORE_LABEL, UKBOB_COMPONENT_RANGES, UKBOB_LABELS, ComponentRange
from custom.solf.cohort import apply_actions, organ_actions
from custom.solf.features import DEFAULT_MIN_FRACTION, OrganFeatures, clean_components, volume_features
from custom.transforms import ArrayTwind


def _as_numpy_3d(label: Any) -> np.ndarray:
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim != 4 or arr.shape[0] != 1:
        raise ValueError(f"expected a channel-first label map (1, H, W, D), got shape {arr.shape}")
    arr = arr[0]
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    return arr.astype(np.int32)


def _affine(label: Any, affine: np.ndarray | None) -> np.ndarray | None:
    if affine is not None:
        return np.asarray(affine)
    if isinstance(label, MetaTensor):
        return label.affine.detach().cpu().numpy()
    return None


def _back(arr: np.ndarray, like: Any) -> Any:
    out, *_ = convert_to_dst_type(arr[None], like, dtype=like.dtype if hasattr(like, "dtype") else None)
    return out


class OrganComponentFilter(Transform):
    """Keep each organ's largest components, as many as its expected range allows (SOLF stage A.1).

    Input: integer label map ``(1, H, W, D)``. Output: the same shape and type, stray fragments set to 0.
    Raises :class:`~custom.errors.InputError` for an id that is neither in ``ranges``, 0 nor ``ignore_value``.
    """

    def __init__(
        self,
        ranges: Mapping[int, ComponentRange] = UKBOB_COMPONENT_RANGES,
        min_fraction: float = DEFAULT_MIN_FRACTION,
        ignore_value: int = IGNORE_LABEL,
    ):
        self.ranges, self.min_fraction = ranges, min_fraction
        self.known_ids = {0, ignore_value, *ranges}

    def __call__(self, label: Any) -> Any:
        arr = _as_numpy_3d(label)
        check_label_ids(arr, self.known_ids, source_name(label))
        cleaned, _ = clean_components(arr, self.ranges, self.min_fraction)
        return _back(cleaned, label)


class OrganComponentFilterd(ArrayTwind):
    """Dictionary version of :class:`OrganComponentFilter`."""

    def __init__(
        self,
        keys: KeysCollection,
        ranges: Mapping[int, ComponentRange] = UKBOB_COMPONENT_RANGES,
        min_fraction: float = DEFAULT_MIN_FRACTION,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = OrganComponentFilter(ranges, min_fraction)


class SOLFFeatures(Transform):
    """Stage-A features of one label map: a list of :class:`~custom.solf.features.OrganFeatures`.

    Input: label map ``(1, H, W, D)`` (spacing from its MetaTensor affine) and optionally the image
    ``(C, H, W, D)`` for the body volume. Output: one record per organ present (volumes in mL, areas
    in mm^2), measured after component cleaning (``clean=False`` measures the raw masks).
    Raises :class:`~custom.errors.InputError` for an id that is not a key of ``organ_names``.
    """

    def __init__(
        self,
        organ_names: Mapping[int, str] = UKBOB_LABELS,
        ranges: Mapping[int, ComponentRange] = UKBOB_COMPONENT_RANGES,
        min_fraction: float = DEFAULT_MIN_FRACTION,
        clean: bool = True,
    ):
        self.organ_names, self.ranges, self.min_fraction, self.clean = organ_names, ranges, min_fraction, clean

    def __call__(self, label: Any, image: Any = None, affine: np.ndarray | None = None) -> list[OrganFeatures]:
        img = None
        if image is not None:
            img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        arr = _as_numpy_3d(label)
        check_label_ids(arr, self.organ_names, source_name(label))
        _, rows = volume_features(arr, _affine(label, affine), img, self.organ_names, self.ranges, self.min_fraction, self.clean)
        return rows


class SOLFFeaturesd(MapTransform):
    """Dictionary version of :class:`SOLFFeatures`: stores the records under ``features_key``."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str | None = None,
        features_key: str = "solf_features",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.features_key = image_key, features_key
        self.features = SOLFFeatures(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.features_key] = self.features(d[key], d.get(self.image_key) if self.image_key else None)
        return d


class DecisionTable:
    """``decisions.csv`` loaded once: the actions of one volume, looked up by its label file path.

    Volumes are stored relative to the datalist (``labels/case_001.nii.gz``); a loaded file name
    (often absolute) matches the entry that it ends with.
    """

    def __init__(self, decisions: str | Path | pd.DataFrame):
        df = decisions if isinstance(decisions, pd.DataFrame) else pd.read_csv(decisions)
        self.actions = organ_actions(df)
        self.known = set(df["volume"].astype(str))

    def lookup(self, filename: str) -> dict[int, str] | None:
        """Actions of that volume (``{}`` when all kept), or ``None`` when the table does not know it."""
        parts = Path(str(filename)).as_posix().split("/")
        for i in range(len(parts)):
            key = "/".join(parts[i:])
            if key in self.known:
                return self.actions.get(key, {})
        return None


class UnknownVolumeError(InputError, KeyError):
    """A label file that the SOLF decisions table does not list: one line (an :class:`InputError`, so
    bundle runs exit 2 with it) that is also a ``KeyError`` (a lookup that failed)."""

    __str__ = InputError.__str__


class ApplySOLFDecision(Transform):
    """Apply SOLF stage-B decisions to one label map.

    Input: label map ``(1, H, W, D)`` whose MetaTensor ``filename_or_obj`` (or ``filename=``) names the
    volume. Output: the same, with each rejected organ set to ``ignore_value`` (action ``ignore``)
    or 0 (``background``). A volume missing from the table raises :class:`UnknownVolumeError` (a
    ``KeyError`` and an :class:`~custom.errors.InputError`) unless
    ``allow_unknown=True`` (then it passes unchanged).
    """

    def __init__(self, decisions: str | Path | pd.DataFrame | DecisionTable, ignore_value: int = IGNORE_LABEL, allow_unknown: bool = False):
        self.table = decisions if isinstance(decisions, DecisionTable) else DecisionTable(decisions)
        self.ignore_value, self.allow_unknown = ignore_value, allow_unknown

    def __call__(self, label: Any, filename: str | None = None) -> Any:
        if filename is None and isinstance(label, MetaTensor):
            filename = source_name(label)
        actions = self.table.lookup(str(filename)) if filename is not None else None
        if actions is None:
            if self.allow_unknown:
                return label
            raise UnknownVolumeError(filename, "not in the SOLF decisions table", "run `python -m custom.solf run` on this datalist")
        if not actions:
            return label
        return _back(apply_actions(_as_numpy_3d(label), actions, self.ignore_value).astype(np.int32), label)


class ApplySOLFDecisiond(ArrayTwind):
    """Dictionary version of :class:`ApplySOLFDecision` (the label's file name comes from its metadata)."""

    def __init__(
        self,
        keys: KeysCollection,
        decisions: str | Path | pd.DataFrame,
        ignore_value: int = IGNORE_LABEL,
        allow_unknown: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.transform = ApplySOLFDecision(decisions, ignore_value, allow_unknown)


class SOLFQC(Transform):
    """Per-scan QC of one label map against a cohort reference: the QC dict of :func:`custom.solf.qc.scan_qc`.

    Input: label map ``(1, H, W, D)`` in ``taxonomy`` ids (spacing from its MetaTensor affine, or
    ``affine=``). ``reference``: path of a reference file (``models/qc_reference.json``), loaded once and
    checked against ``taxonomy``.
    """

    def __init__(self, reference: str | Path, taxonomy: str, eps: float | None = None):
        from custom.solf.cohort import DEFAULT_EPS
        from custom.solf.reference import load

        self.reference, self.taxonomy = load(reference, taxonomy), taxonomy
        self.eps = DEFAULT_EPS if eps is None else float(eps)

    def __call__(self, label: Any, affine: np.ndarray | None = None) -> dict[str, Any]:
        from custom.solf.qc import scan_qc

        return scan_qc(_as_numpy_3d(label), _affine(label, affine), self.reference, self.taxonomy, self.eps)


class SOLFQCd(MapTransform):
    """Dictionary version of :class:`SOLFQC`, usable as a ``qc`` step after ``postprocessing``.

    Stores the QC dict under ``qc_key``; with ``output_dir`` also writes ``<case>_qc.json`` and
    ``<case>_qc.png`` there (case name from the label's ``filename_or_obj``; the PNG shows the
    flagged organs on ``image_key``, which must be on the label's grid, e.g. after ``Invertd``).
    The data pass through unchanged. Example (``inference.json``)::

        "qc": {"_target_": "custom.solf.transforms.SOLFQCd", "keys": "pred", "image_key": "image",
               "reference": "$@bundle_root + '/models/qc_reference.json'", "taxonomy": "btcv",
               "output_dir": "@output_dir"}
    """

    def __init__(self, keys: KeysCollection, reference: str | Path, taxonomy: str, image_key: str | None = None,
                 output_dir: str | Path | None = None, qc_key: str = "qc", eps: float | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.qc = SOLFQC(reference, taxonomy, eps)
        self.image_key, self.qc_key = image_key, qc_key
        self.output_dir = Path(output_dir) if output_dir else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from custom.solf.qc import qc_paths, save_qc_png

        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            result = self.qc(label)
            d[self.qc_key] = result
            if self.output_dir is not None:
                name = case_name(source_name(label) or "case")
                json_path, png_path = qc_paths(self.output_dir / f"{name}.nii.gz")
                atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
                image = d.get(self.image_key) if self.image_key else None
                image = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
                save_qc_png(png_path, result, _as_numpy_3d(label), image, _affine(label, None), title=name)
        return d
