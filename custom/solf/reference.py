"""Cohort references: SOLF's per-organ robust fit, saved as a small versioned JSON file.

A reference is what stage B learns from a cohort (``docs/qc.md``, cohort references): for every organ the median
and the scaled MAD (1.4826 x MAD) of normalised volume, sphericity and eccentricity over its whole
(not partial) masks, the sample count, the label taxonomy the maps were in (normalised volume
depends on it: the body is the union of that taxonomy's labels) and where it came from. A bundle ships
one (``models/qc_reference.json``) so that per-scan QC (:mod:`custom.solf.qc`) judges a new
prediction against the training cohort with the same eps / 2-of-3 rule.

    python -m custom.solf reference --datalist dataset.json -o qc_reference.json [--taxonomy btcv]

Plain JSON, pandas and NumPy: no MONAI, no torch.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from custom.atomic import atomic_write_text, check_writable_dir
from custom.checks import check_readable
from custom.errors import InputError
from custom.labels import TO_UKBOB
from custom.solf import cohort
from custom.solf.features import BORDER_MARGIN, FEATURES

FORMAT = "swin-bob-solf-reference"
#: bump when the meaning of a field changes; files of another version are refused
VERSION = 1


@dataclass(frozen=True)
class CohortReference:
    """Per-organ robust statistics of a cohort, keyed by UKBOB organ id.

    ``organs[id]``: ``organ`` (UKBOB name), ``n`` (whole masks fitted), ``n_partial`` (masks left out
    because the field of view cut them), ``fitted`` (``n >= min_samples``) and for each feature ``f``
    of :data:`~custom.solf.features.FEATURES`: ``f_median``, ``f_sd`` (1.4826 x MAD); also
    ``volume_ml_median`` / ``volume_ml_sd`` (absolute volume: a partial organ above that band is too
    large whatever the cut, while its normalised volume also depends on how much body the scan holds).
    """

    taxonomy: str
    organs: Mapping[int, Mapping[str, Any]]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    min_samples: int = cohort.DEFAULT_MIN_SAMPLES

    def thresholds(self, eps: float = cohort.DEFAULT_EPS) -> pd.DataFrame:
        """The reference as :func:`custom.solf.cohort.fit` returns it, for :func:`cohort.decide`."""
        rows = []
        for organ_id, o in sorted(self.organs.items()):
            row: dict[str, Any] = {"organ_id": int(organ_id), "organ": o["organ"], "n": o["n"], "fitted": bool(o["fitted"])}
            for f in FEATURES:
                med, sd = _num(o[f"{f}_median"]), _num(o[f"{f}_sd"])
                row.update({f"{f}_median": med, f"{f}_sd": sd, f"{f}_lo": med - eps * sd, f"{f}_hi": med + eps * sd})
            rows.append(row)
        out = pd.DataFrame(rows, columns=["organ_id", "organ", "n", "fitted"] + [f"{f}_{s}" for f in FEATURES for s in ("median", "sd", "lo", "hi")])
        out.attrs["eps"] = eps
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "taxonomy": self.taxonomy, "features": list(FEATURES),
            "sd": "1.4826 x median absolute deviation", "border_margin_voxels": BORDER_MARGIN, "min_samples": self.min_samples,
            "provenance": dict(self.provenance),
            "organs": {str(k): {key: _json_num(v) for key, v in o.items()} for k, o in sorted(self.organs.items())},
        }


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _json_num(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else round(float(v), 6)
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    return v


def build(features: pd.DataFrame, taxonomy: str, provenance: Mapping[str, Any] | None = None,
          min_samples: int = cohort.DEFAULT_MIN_SAMPLES) -> CohortReference:
    """A reference from a stage-A table (``features.parquet`` of ``custom.solf features``).

    Args:
        features: one row per volume and organ with ``organ_id``, ``organ``, ``volume_ml``, the
            :data:`FEATURES` and ``partial``; partial masks are counted but not fitted.
        taxonomy: the taxonomy the label maps were in (a key of :data:`custom.labels.TO_UKBOB`).
        provenance: free-form facts about the source (datalist, volume count, date, settings).
        min_samples: organs with fewer whole masks are kept in the file but not ``fitted``.
    """
    if taxonomy not in TO_UKBOB:
        raise ValueError(f"taxonomy must be one of {sorted(TO_UKBOB)}, got {taxonomy!r}")
    thr = cohort.fit(features, min_samples=min_samples) if len(features) else pd.DataFrame(columns=["organ_id"])
    thr = thr[~cohort.partial_flags(thr)].set_index("organ_id") if len(thr) else thr  # whole masks only
    organs: dict[int, dict[str, Any]] = {}
    flagged = features.assign(_partial=cohort.partial_flags(features))
    for (organ_id, organ), grp in flagged.groupby(["organ_id", "organ"], sort=True):
        whole = grp[~grp["_partial"]]
        entry: dict[str, Any] = {"organ": organ, "n": int(len(whole)), "n_partial": int(len(grp) - len(whole))}
        if organ_id in thr.index:
            t = thr.loc[organ_id]
            entry["fitted"] = bool(t["fitted"])
            for f in FEATURES:
                entry[f"{f}_median"], entry[f"{f}_sd"] = float(t[f"{f}_median"]), float(t[f"{f}_sd"])
        else:  # every mask of this organ was partial
            entry["fitted"] = False
            entry.update({f"{f}_{s}": float("nan") for f in FEATURES for s in ("median", "sd")})
        entry["volume_ml_median"], entry["volume_ml_sd"] = cohort.robust_fit(whole["volume_ml"])
        organs[int(organ_id)] = entry
    prov = {"created": datetime.date.today().isoformat(), "volumes": int(features["volume"].nunique()) if len(features) else 0,
            **dict(provenance or {})}
    return CohortReference(taxonomy, organs, prov, min_samples)


def save(reference: CohortReference, path: str | Path) -> Path:
    """Write ``reference`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(reference.to_json(), indent=1) + "\n")


def load(path: str | Path, taxonomy: str | None = None) -> CohortReference:
    """Read a reference file; with ``taxonomy``, refuse one built from another label taxonomy.

    Raises:
        :class:`custom.errors.InputError`: not a reference file, another format version, or another
        taxonomy (its normalised volumes are not comparable: the body is the union of other labels).
    """
    path = check_readable(path)
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a JSON file ({exc})", "give a file written by `python -m custom.solf reference`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(path, f"not a SOLF cohort reference (format {data.get('format') if isinstance(data, dict) else None!r})",
                         "give a file written by `python -m custom.solf reference`")
    if data.get("version") != VERSION:
        raise InputError(path, f"reference format version {data.get('version')}, this code reads version {VERSION}",
                         "rebuild it with `python -m custom.solf reference --datalist ... -o FILE`")
    if taxonomy is not None and data.get("taxonomy") != taxonomy:
        raise InputError(path, f"the reference was built from {data.get('taxonomy')} labels, these labels are {taxonomy}",
                         f"use a reference built from {taxonomy} label maps (python -m custom.solf reference --taxonomy {taxonomy})")
    if data.get("features") != list(FEATURES):
        raise InputError(path, f"features {data.get('features')} differ from {list(FEATURES)}", "rebuild the reference")
    organs = {int(k): {key: (float("nan") if v is None else v) for key, v in o.items()} for k, o in data["organs"].items()}
    return CohortReference(data["taxonomy"], organs, data.get("provenance", {}), int(data.get("min_samples", cohort.DEFAULT_MIN_SAMPLES)))


def build_from_datalist(datalist: str | Path, output: str | Path, taxonomy: str = "ukbob", work_dir: str | Path | None = None,
                        workers: int = 0, scheduler: str | None = None, keys: Any = None,
                        min_samples: int = cohort.DEFAULT_MIN_SAMPLES, note: str = "") -> CohortReference:
    """Stage A over a datalist through the SOLF runner (:func:`custom.solf.batch.features`), then
    :func:`build` and :func:`save` to ``output``.

    ``work_dir`` keeps the runner's per-volume results (a re-run resumes); by default a temporary
    folder beside ``output``. Volumes that fail stage A are left out and counted in the provenance.
    """
    import shutil
    import tempfile

    from custom.solf import batch

    output = Path(output)
    check_writable_dir(output.parent)
    tmp = None if work_dir else tempfile.mkdtemp(prefix=".reference.", dir=output.parent)
    try:
        work = Path(work_dir or tmp)
        config = batch.StageAConfig(taxonomy=taxonomy)
        stats = batch.features(datalist, work, keys, config, workers=workers, scheduler=scheduler)
        table = pd.read_parquet(work / "features.parquet")
        prov = {"datalist": Path(datalist).name, "keys": keys, "volumes_failed": stats["errors"],
                "stage_a": {"min_fraction": config.min_fraction, "body": config.body, "version": batch.STAGE_A_VERSION}}
        if note:
            prov["note"] = note
        ref = build(table, taxonomy, prov, min_samples)
        save(ref, output)
        return ref
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
