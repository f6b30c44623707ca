"""SOLF stage B: the dataset-level rule (``docs/solf.md``, SOLF method, steps 3-5).

For every organ, each of the three features (normalised volume, sphericity, eccentricity) is fitted
robustly over the cohort (median, MAD x 1.4826). An organ mask is an outlier on a feature when it lies
more than ``eps`` robust standard deviations from the median; it is rejected when at least two of
the three features are outliers (optionally also when it breaks an absolute prior, a third stage that
never acts alone). A partial organ (its mask reaches the field-of-view border, stage A's ``partial``)
is not compared with whole ones: whole and partial masks of an organ are fitted separately, partial
ones with a wider band (``partial_eps``; ``inf`` never judges them). Two exceptions, both because a
cut only removes volume: an organ the cohort rarely sees cut (fewer partial masks than ``min_samples``)
has its partial masks judged against its whole ones, and a partial mask larger in mL than the whole
masks' band gets one more outlier vote. One feature alone rejects a whole mask only when it is gross: a
normalised volume ``gross_volume_bands`` eps-bands from the median (6 robust SDs at eps 2), whatever its
shape. Everything here works on pandas tables: the reduce over
51,761 x 72 rows is small.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from custom.labels import IGNORE_LABEL
from custom.solf.features import FEATURES

DEFAULT_EPS = 2.0
MAD_TO_SD = 1.4826
ACTIONS = ("ignore", "background", "drop")
#: organs seen fewer times than this are never rejected: a robust fit needs a cohort
DEFAULT_MIN_SAMPLES = 5
#: band (robust SDs) for partial masks, judged only against the partial masks of their organ: the level
#: at which the field of view cuts an organ varies, so a cut organ's features spread wider (chosen on
#: benchmarks/solf_detection.py: false rejections 4.3% -> 2.0% at eps 2, see docs/qc.md)
DEFAULT_PARTIAL_EPS = 3.0
#: a partial mask larger (mL) than its organ's whole masks' median + this many robust SDs gets one more
#: outlier vote: a cut only removes volume, so the excess is a spill, merge or over-segmentation that
#: reaches the border (benchmarks/solf_detection.py, docs/qc.md). A vote, never a rejection on its own; the
#: per-scan QC's verdict on its own uses a factor instead (custom.solf.qc.PARTIAL_TOO_LARGE)
PARTIAL_VOLUME_SDS = 3.0
#: a whole mask whose normalised volume lies this many eps-bands from its organ's median (6 robust SDs at
#: eps 2) is rejected without a second vote: truncated and under-segmented organs keep a normal shape
#: (benchmarks/solf_detection.py: recall 389 -> 402 of 560 corrupted masks over four cohorts, false
#: rejections unchanged, docs/qc.md). ``inf``: the paper's 2-of-3 rule alone
GROSS_VOLUME_BANDS = 3.0
#: optional absolute volume priors in mL (SPEC): a third stage, only with ``use_priors=True``
VOLUME_PRIORS_ML: Mapping[int, tuple[float, float]] = {5: (1000.0, 2500.0), 1: (100.0, 300.0), 2: (80.0, 200.0), 3: (80.0, 200.0)}
DECISION_COLUMNS = [
    "volume", "organ_id", "organ", "norm_volume", "sphericity", "eccentricity", "outliers", "rejected", "action",
]


def fit(features: pd.DataFrame, eps: float = DEFAULT_EPS, min_samples: int = DEFAULT_MIN_SAMPLES,
        partial_eps: float = DEFAULT_PARTIAL_EPS, partial_volume_sds: float = PARTIAL_VOLUME_SDS) -> pd.DataFrame:
    """Per-organ robust thresholds, fitted separately on whole and on partial masks.

    Args:
        features: stage-A table with at least ``organ_id``, ``organ`` and the :data:`FEATURES` columns,
            and ``partial`` (organ cut by the field of view; all False when the column is missing).
        eps: number of robust standard deviations that still count as normal (whole masks).
        min_samples: organs with fewer masks in a group get no thresholds (``fitted`` is False).
        partial_eps: the band for partial masks, fitted on the partial masks of the same organ only (a
            cut organ is compared with organs cut like it, never with whole ones); ``inf``: partial masks
            are never judged. An organ with fewer than ``min_samples`` partial masks but enough whole
            ones is one the field of view rarely cuts: its partial masks get the whole masks' band
            (``fitted_on`` says which).
        partial_volume_sds: a partial mask above its organ's whole masks' median + this many robust SDs of
            volume (mL) gets one more outlier vote (``inf``: never).

    Returns:
        one row per organ and ``partial`` group: ``organ_id, organ, partial, n, fitted, fitted_on`` and for
        each feature ``f``: ``f_median, f_sd`` (1.4826 x MAD), ``f_lo, f_hi`` (median -/+ eps x sd); partial
        rows also ``volume_ml_hi`` (whole masks' median + ``partial_volume_sds`` sd, in mL; ``inf``
        when they are too few or there is no ``volume_ml`` column).
    """
    rows = []
    flagged = features.assign(partial=partial_flags(features))
    for (organ_id, organ), grp in flagged.groupby(["organ_id", "organ"], sort=True):
        whole, cut = grp[~grp["partial"]], grp[grp["partial"]]
        whole_band = _band(whole, eps, min_samples)
        if len(whole):
            rows.append({"organ_id": int(organ_id), "organ": organ, "partial": False, "n": len(whole), **whole_band, "fitted_on": "whole"})
        if len(cut):
            rarely_cut = len(cut) < min_samples <= len(whole) and np.isfinite(partial_eps)
            ml_hi = np.inf
            if "volume_ml" in whole and len(whole) >= min_samples:
                med, sd = robust_fit(whole["volume_ml"])
                ml_hi = med + partial_volume_sds * sd
            rows.append({"organ_id": int(organ_id), "organ": organ, "partial": True, "n": len(cut),
                         **(whole_band if rarely_cut else _band(cut, partial_eps, min_samples)),
                         "fitted_on": "whole" if rarely_cut else "partial", "volume_ml_hi": ml_hi})
    out = pd.DataFrame(rows, columns=None if rows else ["organ_id", "organ", "partial", "n", "fitted"])
    out.attrs["eps"] = eps
    return out


def robust_fit(values: pd.Series | np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 x median absolute deviation) of the finite ``values``; NaNs when there are none."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return np.nan, np.nan
    med = float(np.median(x))
    return med, float(MAD_TO_SD * np.median(np.abs(x - med)))


def _band(masks: pd.DataFrame, band: float, min_samples: int) -> dict[str, object]:
    """``fitted`` and, per feature, median, robust SD and the ``band``-SD interval of ``masks``."""
    row: dict[str, object] = {"fitted": len(masks) >= min_samples and bool(np.isfinite(band))}
    for f in FEATURES:
        med, sd = robust_fit(masks[f])
        half = band * sd if np.isfinite(band) else np.inf
        row.update({f"{f}_median": med, f"{f}_sd": sd, f"{f}_lo": med - half, f"{f}_hi": med + half})
    return row


def partial_flags(features: pd.DataFrame) -> np.ndarray:
    """Stage A's ``partial`` column as bool (all False for a table from before the flag existed)."""
    if "partial" not in features:
        return np.zeros(len(features), dtype=bool)
    return features["partial"].fillna(False).to_numpy(dtype=bool)


def decide(
    features: pd.DataFrame,
    thresholds: pd.DataFrame,
    action: str = "ignore",
    min_votes: int = 2,
    use_priors: bool = False,
    priors: Mapping[int, tuple[float, float]] = VOLUME_PRIORS_ML,
    max_rejected: int = 3,
    gross_volume_bands: float = GROSS_VOLUME_BANDS,
) -> pd.DataFrame:
    """The decision table: one row per volume and organ, with the outlier vote and the action.

    Args:
        features: stage-A table (``volume``, ``organ_id``, ``organ``, features, ``volume_ml``).
        thresholds: the output of :func:`fit`.
        action: what happens to a rejected mask: ``ignore`` (voxels -> ``IGNORE_LABEL``, masked by the
            loss), ``background`` (voxels -> 0) or ``drop`` (the whole volume is excluded when more
            than ``max_rejected`` of its organs are rejected; otherwise its rejected masks are ignored).
        min_votes: features that must be outliers to reject (the paper's rule: 2 of 3).
        use_priors: also reject masks whose ``volume_ml`` breaks ``priors`` (a third stage).
        gross_volume_bands: a whole mask whose ``norm_volume`` lies more than this many times the eps
            band's half-width from the median is rejected on that feature alone (``inf``: never).

    Returns:
        :data:`DECISION_COLUMNS` plus ``out_<feature>`` flags, ``gross_volume`` (rejected on volume
        alone), ``partial_too_large`` (the extra vote of a
        partial mask above its organ's whole-mask volume band, counted in ``outliers``), ``prior_violation``
        and ``partial`` (a partial mask is judged against the partial rows of ``thresholds`` only, never by
        the priors).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    cols = ["organ_id", "partial", "fitted"] + [f"{f}_{s}" for f in FEATURES for s in ("lo", "hi")]
    cols += ["volume_ml_hi"] if "volume_ml_hi" in thresholds else []
    thresholds = thresholds.assign(partial=partial_flags(thresholds))
    d = features.assign(partial=partial_flags(features)).merge(thresholds[cols], on=["organ_id", "partial"], how="left")
    fitted = d["fitted"].fillna(False).astype(bool)
    votes = np.zeros(len(d), dtype=int)
    for f in FEATURES:
        out = fitted & ((d[f] < d[f"{f}_lo"]) | (d[f] > d[f"{f}_hi"]))
        d[f"out_{f}"] = out.to_numpy()
        votes += out.to_numpy(dtype=int)
    # a cut only removes volume: a partial mask above the whole masks' band has one more vote
    too_large = np.zeros(len(d), dtype=bool)
    if {"volume_ml", "volume_ml_hi"} <= set(d):
        too_large = (fitted & d["partial"] & (d["volume_ml"] > d["volume_ml_hi"])).to_numpy(dtype=bool)
    d["partial_too_large"] = too_large
    votes += too_large
    d["outliers"] = votes
    # that far out in volume a whole organ is wrong whatever its shape (truncation, under-segmentation keep
    # a normal shape); a cut organ is smaller by nature and is judged by its votes
    centre = (d["norm_volume_lo"] + d["norm_volume_hi"]) / 2
    half = (d["norm_volume_hi"] - d["norm_volume_lo"]) / 2
    gross = (fitted & ~d["partial"] & ((d["norm_volume"] - centre).abs() > gross_volume_bands * half)).to_numpy(dtype=bool)
    d["gross_volume"] = gross
    prior_bad = np.zeros(len(d), dtype=bool)
    if use_priors:
        lo = d["organ_id"].map(lambda i: priors.get(int(i), (-np.inf, np.inf))[0]).to_numpy(dtype=float)
        hi = d["organ_id"].map(lambda i: priors.get(int(i), (-np.inf, np.inf))[1]).to_numpy(dtype=float)
        prior_bad = ((d["volume_ml"].to_numpy() < lo) | (d["volume_ml"].to_numpy() > hi)) & ~d["partial"].to_numpy()
    d["prior_violation"] = prior_bad
    d["rejected"] = (votes >= min_votes) | gross | prior_bad
    per_volume = d.groupby("volume")["rejected"].transform("sum")
    if action == "drop":
        d["action"] = np.where(per_volume > max_rejected, "drop", np.where(d["rejected"], "ignore", "keep"))
    else:
        d["action"] = np.where(d["rejected"], action, "keep")
    extra = [f"out_{f}" for f in FEATURES] + ["gross_volume", "partial_too_large", "prior_violation", "partial"]
    return d[DECISION_COLUMNS + extra].sort_values(["volume", "organ_id"]).reset_index(drop=True)


def summary(decisions: pd.DataFrame, thresholds: pd.DataFrame) -> pd.DataFrame:
    """Per-organ kept / rejected counts joined to the thresholds used (``thresholds.csv``)."""
    decisions = decisions.assign(partial=partial_flags(decisions))
    counts = decisions.groupby(["organ_id", "partial"]).agg(kept=("rejected", lambda r: int((~r).sum())), rejected=("rejected", "sum"))
    out = thresholds.assign(partial=partial_flags(thresholds)).merge(counts.reset_index(), on=["organ_id", "partial"], how="left")
    out[["kept", "rejected"]] = out[["kept", "rejected"]].fillna(0).astype(int)
    return out


def organ_actions(decisions: pd.DataFrame) -> dict[str, dict[int, str]]:
    """``{volume: {organ_id: action}}`` for every mask whose action is not ``keep``."""
    bad = decisions[decisions["action"] != "keep"]
    out: dict[str, dict[int, str]] = {}
    for vol, organ, act in zip(bad["volume"], bad["organ_id"], bad["action"]):
        out.setdefault(str(vol), {})[int(organ)] = str(act)
    return out


def dropped_volumes(decisions: pd.DataFrame) -> set[str]:
    """Volumes excluded by the ``drop`` action."""
    return set(decisions.loc[decisions["action"] == "drop", "volume"].astype(str))


def apply_actions(labels: np.ndarray, actions: Mapping[int, str], ignore_value: int = IGNORE_LABEL) -> np.ndarray:
    """Relabel rejected organs of one label map: ``ignore`` -> ``ignore_value``, ``background`` -> 0.

    ``drop`` marks a volume that should not be used at all; its organs are left unchanged here
    (use :func:`keep_volumes` on the datalist). Returns a new array with the dtype widened when
    ``ignore_value`` does not fit.
    """
    labels = np.asarray(labels)
    if not actions:
        return labels.copy()
    table = np.arange(max(int(labels.max(initial=0)), max(actions)) + 1, dtype=np.int64)
    for organ, act in actions.items():
        if act == "ignore":
            table[organ] = ignore_value
        elif act == "background":
            table[organ] = 0
    dtype = labels.dtype if np.can_cast(np.min_scalar_type(ignore_value), labels.dtype) else np.int16
    return table[labels.astype(np.int64)].astype(dtype)


def keep_volumes(datalist: Iterable[Mapping], decisions: pd.DataFrame | str, key: str = "label") -> list[Mapping]:
    """The datalist without the volumes that the ``drop`` action excluded (usable from bundle configs)."""
    if isinstance(decisions, str):
        decisions = pd.read_csv(decisions)
    dropped = dropped_volumes(decisions)
    if not dropped:
        return list(datalist)
    return [item for item in datalist if match_volume(str(item[key]), dropped) is None]


def match_volume(path: str, volumes: Iterable[str]) -> str | None:
    """The entry of ``volumes`` (paths relative to a datalist) that ``path`` ends with, if any."""
    norm = path.replace("\\", "/")
    for vol in volumes:
        if norm == vol or norm.endswith("/" + vol.lstrip("./")):
            return vol
    return None
