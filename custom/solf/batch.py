"""The SOLF dataset runner: stage A in parallel, stage B on one machine, resumable, bad-file tolerant.

Stage A runs through one executor interface, either a local :class:`ProcessPoolExecutor` (default,
``workers`` processes) or an existing Dask cluster (``scheduler="tcp://host:8786"``, through
``distributed.Client.submit`` / ``distributed.as_completed``). Each volume's result is written by the
worker as one JSON file under ``<output_dir>/stage_a/`` (atomically), so a killed run loses only the
volumes in flight and a re-run skips every volume whose result is on disk and still matches its input
file (size, mtime) and the stage-A settings. Unreadable or invalid label files become rows of
``errors.csv``; the run goes on.

Workers import only NumPy/SciPy/scikit-image/nibabel (no torch, no MONAI), so they start fast.

Outputs in ``output_dir``: ``features.parquet``, ``thresholds.csv``, ``decisions.csv``,
``errors.csv``, ``summary.json``, ``plots/<id>_<organ>.png``, ``labels/...`` (filtered label maps
with the input's folder layout) and ``datalist.json`` (the input datalist pointing at them, dropped
volumes removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from custom.atomic import atomic_path, atomic_write_text, check_writable_dir, remove_temp_files
from custom.checks import check_affine, check_label_ids, check_readable
from custom.errors import InputError
from custom.labels import IGNORE_LABEL, MAX_LABEL_ID, TO_UKBOB, UKBOB_COMPONENT_RANGES, UKBOB_LABELS, UKBOB_UNUSED_IDS, to_ukbob
from custom.parallel import Executor
from custom.solf import cohort
from custom.solf.features import DEFAULT_MIN_FRACTION, FEATURES, volume_features

STAGE_A_VERSION = 2  # bump when stage-A outputs change meaning: old per-volume results are recomputed (2: partial flag)
ERROR_COLUMNS = ["volume", "label", "stage", "error"]


@dataclass(frozen=True)
class Item:
    """One datalist entry: ``volume`` is the label path as written in the datalist (its id)."""

    volume: str
    label: str
    image: str | None = None


@dataclass(frozen=True)
class StageAConfig:
    min_fraction: float = DEFAULT_MIN_FRACTION
    clean: bool = True
    body: str = "labels"  # "labels": union of labels; "image": image foreground
    taxonomy: str = "ukbob"  # ids of the label files (a key of custom.labels.TO_UKBOB); measured in UKBOB ids

    def fingerprint(self) -> str:
        text = json.dumps({**asdict(self), "version": STAGE_A_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- worker side
def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def result_path(output_dir: Path, volume: str) -> Path:
    return output_dir / "stage_a" / f"{hashlib.sha1(volume.encode()).hexdigest()[:20]}.json"


def load_labels(path: str, max_id: int = max(UKBOB_LABELS), unused: frozenset[int] = UKBOB_UNUSED_IDS) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read and validate one label map: ``(integer array (H, W, D), affine, nibabel header)``.

    Raises :class:`InputError` for a missing, unreadable, non-3D or non-integer file, ids outside
    the taxonomy (``0..max_id`` without the ``unused`` ids), or a zero/NaN voxel spacing.
    """
    import nibabel as nib

    if not os.path.exists(path):
        raise InputError(path, "file not found", "correct the datalist entry")
    try:
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - every reader failure means the same to the user
        raise InputError(path, f"cannot be read as a label map ({_first_line(exc)})", "re-export the file") from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputError(path, f"expected a 3D label map, got shape {arr.shape}", "give one label map per volume")
    if arr.size == 0:
        raise InputError(path, "the label map has no voxels", "re-export the file")
    if arr.dtype.kind not in "iuf":
        raise InputError(path, f"label dtype {arr.dtype} is not an integer type", "save labels as integers")
    check_label_ids(arr, set(range(max_id + 1)) - set(unused), path,
                    fix="remap the labels to UKBOB ids or give their --taxonomy")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, path)
    return (arr.astype(np.int32) if arr.dtype.kind == "f" else arr), affine, img.header


def _first_line(exc: BaseException) -> str:
    """The first line of a reader's error (at most 120 characters), for a one-line message."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]


def stage_a_volume(item: Item, output_dir: str, config: StageAConfig) -> dict[str, Any]:
    """Worker task: stage A of one volume, result written to ``stage_a/<hash>.json``; returns it.

    A bad file returns ``{"volume", "error"}`` instead (nothing written, so a fixed file is retried).
    """
    out = result_path(Path(output_dir), item.volume)
    try:
        labels, affine, _ = load_labels(item.label, MAX_LABEL_ID[config.taxonomy], UKBOB_UNUSED_IDS if config.taxonomy == "ukbob" else frozenset())
        labels = to_ukbob(labels, config.taxonomy)
        image = None
        if config.body == "image" and item.image:
            import nibabel as nib

            try:
                image = np.asanyarray(nib.load(item.image).dataobj).astype(np.float32)
            except Exception as exc:  # noqa: BLE001 - every reader failure means the same to the user
                raise InputError(item.image, f"cannot be read as an image ({_first_line(exc)})", "re-export the file") from None
            image = np.moveaxis(image, -1, 0) if image.ndim == 4 else image
            if image.shape[-3:] != labels.shape:
                raise InputError(item.label, f"the label grid {labels.shape} differs from its image's {image.shape[-3:]}",
                                 "resample the label onto its image (nearest neighbour) or pair the right files")
        _, rows = volume_features(
            labels, affine, image, UKBOB_LABELS, UKBOB_COMPONENT_RANGES, config.min_fraction, config.clean, copy=False
        )
    except InputError as exc:
        return {"volume": item.volume, "label": item.label, "error": str(exc)}
    result = {
        "volume": item.volume, "label": item.label, "fingerprint": config.fingerprint(), "stat": _stat(item.label),
        "rows": [{"volume": item.volume, **asdict(r)} for r in rows],
    }
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result))
    return result


def _is_done(item: Item, output_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = result_path(output_dir, item.volume)
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
        ok = res["volume"] == item.volume and res["fingerprint"] == fingerprint and res["stat"] == _stat(item.label)
    except (OSError, ValueError, KeyError):
        return None
    return res if ok else None


def apply_volume(item: Item, output_dir: str, config: StageAConfig, ignore_value: int, actions: dict[int, str]) -> dict[str, Any]:
    """Worker task: write the filtered label map (cleaned components + decisions) under ``labels/``."""
    import nibabel as nib

    from custom.solf.features import clean_components

    target = Path(output_dir) / "labels" / filtered_name(item.volume)
    try:
        labels, affine, header = load_labels(item.label)
    except InputError as exc:
        return {"volume": item.volume, "label": item.label, "error": str(exc)}
    if config.clean:
        labels, _ = clean_components(labels, UKBOB_COMPONENT_RANGES, config.min_fraction)
    out = cohort.apply_actions(labels, actions, ignore_value).astype(np.uint8 if ignore_value <= 255 else np.int16)
    header = header.copy()
    header.set_data_dtype(out.dtype)
    header["scl_slope"], header["scl_inter"] = 1, 0
    with atomic_path(target) as tmp:
        nib.save(nib.Nifti1Image(out, affine, header), str(tmp))
    return {"volume": item.volume, "path": str(target)}


def filtered_name(volume: str) -> str:
    """Where a volume's filtered labels go, relative to ``<output_dir>/labels`` (absolute paths flattened)."""
    p = Path(volume)
    return p.as_posix().lstrip("/").replace("../", "up/") if not p.is_absolute() else "abs/" + p.as_posix().lstrip("/")


def _stage_output(out: Path, name: str, made_by: str) -> Path:
    """``out/name``, written by an earlier step; :class:`InputError` naming that step when it is missing."""
    path = Path(out) / name
    if not path.is_file():
        raise InputError(path, "not found", f"run `python -m custom.solf {made_by}` with this --output_dir first (or `run`)")
    return path


def _map(
    executor: Executor, fn: Callable, items: Sequence[Item], args: tuple, desc: str,
    item_args: Callable[[Item], tuple] = lambda item: (),
) -> tuple[list[dict], list[dict]]:
    """Run ``fn(item, *args, *item_args(item))`` for every item with a progress bar; (results, errors)."""
    from tqdm import tqdm

    results, errors = [], []
    futures = {executor.submit(fn, item, *args, *item_args(item)): item for item in items}
    with tqdm(total=len(futures), desc=desc, unit="vol", file=sys.stderr, disable=not items) as bar:
        try:
            for fut in executor.as_completed(list(futures)):
                item = futures[fut]
                try:
                    res = fut.result()
                except BrokenProcessPool:
                    raise
                except Exception as exc:  # noqa: BLE001 - an unexpected failure of one volume is reported, not fatal
                    res = {"volume": item.volume, "label": item.label, "error": f"{item.label}: {type(exc).__name__}: {exc}"}
                (errors if "error" in res else results).append(res)
                bar.update()
        except BrokenProcessPool:
            missing = len(futures) - len(results) - len(errors)
            raise RuntimeError(
                f"a worker process died; {missing} volume(s) were not processed. Re-run the same command to resume"
            ) from None
    return results, errors


# ---------------------------------------------------------------- datalist
def read_datalist(datalist: str | Path, keys: Sequence[str] | str | None = None) -> list[Item]:
    """Items with a ``label`` from a Decathlon-style datalist (paths relative to its folder).

    ``keys``: the lists to read (default every top-level list whose entries have a ``label``).
    """
    path = check_readable(datalist)
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise InputError(path, f"not valid JSON ({exc})", "give a Decathlon-style datalist (dataset.json)") from None
    keys = [keys] if isinstance(keys, str) else keys
    if keys is None:
        keys = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict) and "label" in v[0]]
    if not keys or any(k not in data for k in keys):
        raise InputError(path, f"no list of entries with a 'label' under {keys or 'any key'}", "use e.g. --keys training")
    base = Path(path).resolve().parent
    items, seen = [], set()
    for key in keys:
        for entry in data[key]:
            if "label" not in entry or entry["label"] in seen:
                continue
            seen.add(entry["label"])
            label = entry["label"]
            image = entry.get("image")
            items.append(
                Item(volume=label, label=str(base / label), image=str(base / image) if isinstance(image, str) else None)
            )
    return items


# ---------------------------------------------------------------- the steps
def features(
    datalist: str | Path, output_dir: str | Path, keys: Sequence[str] | str | None = None,
    config: StageAConfig = StageAConfig(), **executor: Any,
) -> dict[str, Any]:
    """Stage A over a datalist: ``features.parquet`` and ``errors.csv`` (resumes from ``stage_a/``).

    ``keys``: the datalist's lists to read (:func:`read_datalist`). ``executor``: where the volumes are
    computed, :class:`custom.parallel.Executor`'s ``workers`` (local processes, 0: one per core) or
    ``scheduler`` (a Dask address); the same for :func:`apply` and :func:`run`.
    """
    if config.taxonomy not in TO_UKBOB:
        raise InputError(None, f"unknown taxonomy {config.taxonomy!r}", f"use one of {', '.join(sorted(TO_UKBOB))}")
    out = check_writable_dir(output_dir)
    items = read_datalist(datalist, keys)
    fp = config.fingerprint()
    done, todo = [], []
    for item in items:
        res = _is_done(item, out, fp)
        (done.append(res) if res else todo.append(item))
    print(f"stage A: {len(items)} volumes, {len(done)} already done, {len(todo)} to compute", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        with Executor(**executor) as ex:
            results, errors = _map(ex, stage_a_volume, todo, (str(out), config), "SOLF stage A")
    finally:
        remove_temp_files(out / "stage_a")  # a killed worker's unfinished result
    rows = [row for res in done + results for row in res["rows"]]
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(["volume", "organ_id"]).reset_index(drop=True)
    with atomic_path(out / "features.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    errs = pd.DataFrame([{"volume": e["volume"], "label": e["label"], "stage": "features", "error": e["error"]} for e in errors], columns=ERROR_COLUMNS)
    atomic_write_text(out / "errors.csv", errs.to_csv(index=False))
    stats = {"volumes": len(items), "skipped": len(done), "computed": len(results), "errors": len(errors),
             "rows": len(table), "seconds": round(time.time() - t0, 2)}
    atomic_write_text(out / "stage_a_run.json", json.dumps(stats, indent=2))
    return stats


def fit(
    output_dir: str | Path,
    eps: float = cohort.DEFAULT_EPS,
    action: str = "ignore",
    min_samples: int = cohort.DEFAULT_MIN_SAMPLES,
    min_votes: int = 2,
    use_priors: bool = False,
    max_rejected: int = 3,
    reference: Any = None,
    partial_eps: float = cohort.DEFAULT_PARTIAL_EPS,
    gross_volume_bands: float = cohort.GROSS_VOLUME_BANDS,
) -> dict[str, Any]:
    """Stage B: ``thresholds.csv`` (per organ) and ``decisions.csv`` (per volume and organ).

    ``reference``: a :class:`~custom.solf.reference.CohortReference`; when given, every mask is judged
    against its per-organ fit instead of this cohort's own (``min_samples`` is then the reference's;
    it holds whole organs only, so partial masks are not judged). ``partial_eps``: the band for partial
    masks among the partial masks of their organ (:func:`cohort.fit`; ``inf``: never judged).
    ``gross_volume_bands``: a whole mask this many eps-bands out in volume is rejected alone
    (:func:`cohort.decide`; ``inf``: the 2-of-3 vote only).
    """
    out = Path(output_dir)
    table = pd.read_parquet(_stage_output(out, "features.parquet", "features"))
    if table.empty:
        thr = pd.DataFrame(columns=["organ_id", "organ", "n", "fitted"])
        dec = pd.DataFrame(columns=cohort.DECISION_COLUMNS)
    else:
        thr = reference.thresholds(eps) if reference is not None else cohort.fit(table, eps, min_samples, float(partial_eps))
        dec = cohort.decide(table, thr, action, min_votes, use_priors, max_rejected=max_rejected,
                            gross_volume_bands=float(gross_volume_bands))
        thr = cohort.summary(dec, thr)
    atomic_write_text(out / "thresholds.csv", thr.to_csv(index=False))
    atomic_write_text(out / "decisions.csv", dec.to_csv(index=False))
    settings = {"eps": eps, "action": action, "min_samples": min_samples, "min_votes": min_votes,
                "use_priors": use_priors, "max_rejected": max_rejected, "partial_eps": float(partial_eps),
                "gross_volume_bands": float(gross_volume_bands),
                "reference": dict(reference.provenance, taxonomy=reference.taxonomy) if reference is not None else None}
    atomic_write_text(out / "fit_settings.json", json.dumps(settings, indent=2))
    return {"organs": len(thr), "masks": len(dec), "rejected": int(dec["rejected"].sum()) if len(dec) else 0}


def apply(
    datalist: str | Path, output_dir: str | Path, keys: Sequence[str] | str | None = None,
    config: StageAConfig = StageAConfig(), ignore_value: int = IGNORE_LABEL, **executor: Any,
) -> dict[str, Any]:
    """Write filtered label maps under ``labels/`` and ``datalist.json`` pointing at them.

    Volumes dropped by the ``drop`` action are left out of ``datalist.json``; volumes listed in
    ``errors.csv`` too. A filtered file newer than ``decisions.csv`` is not rewritten (resume).
    """
    out = Path(output_dir)
    dec = pd.read_csv(_stage_output(out, "decisions.csv", "fit"))
    actions = cohort.organ_actions(dec)
    dropped = cohort.dropped_volumes(dec)
    known = set(dec["volume"].astype(str)) | set(pd.read_parquet(_stage_output(out, "features.parquet", "features"), columns=["volume"])["volume"].astype(str)) if len(dec) else set()
    items = [i for i in read_datalist(datalist, keys) if i.volume in known and i.volume not in dropped]
    stamp = (out / "decisions.csv").stat().st_mtime_ns
    todo = [i for i in items if not _newer(out / "labels" / filtered_name(i.volume), stamp)]
    print(f"apply: {len(items)} volumes, {len(items) - len(todo)} already written", file=sys.stderr, flush=True)
    try:
        with Executor(**executor) as ex:
            results, errors = _map(ex, apply_volume, todo, (str(out), config, ignore_value), "SOLF apply",
                                   lambda item: (actions.get(item.volume, {}),))
    finally:
        remove_temp_files(out / "labels", recursive=True)  # a killed worker's unfinished label map
    _write_datalist(datalist, out, keys, known - dropped - {e["volume"] for e in errors})
    if errors:
        old = pd.read_csv(out / "errors.csv") if (out / "errors.csv").exists() else pd.DataFrame(columns=ERROR_COLUMNS)
        new = pd.DataFrame([{"volume": e["volume"], "label": e["label"], "stage": "apply", "error": e["error"]} for e in errors])
        atomic_write_text(out / "errors.csv", pd.concat([old, new]).to_csv(index=False))
    return {"written": len(results), "skipped": len(items) - len(todo), "dropped": len(dropped), "errors": len(errors)}


def _newer(path: Path, stamp: int) -> bool:
    return path.exists() and path.stat().st_mtime_ns >= stamp


def _write_datalist(datalist: str | Path, out: Path, keys: Sequence[str] | str | None, keep: set[str]) -> None:
    data = json.loads(Path(datalist).read_text())
    base = Path(datalist).resolve().parent
    keys = [keys] if isinstance(keys, str) else keys
    for key, value in data.items():
        if not isinstance(value, list) or not value or not isinstance(value[0], dict) or "label" not in value[0]:
            continue
        if keys is not None and key not in keys:
            continue
        new = []
        for entry in value:
            if entry.get("label") not in keep:
                continue
            entry = dict(entry)
            for k, v in entry.items():
                if isinstance(v, str) and k != "label" and (base / v).exists():
                    entry[k] = str((base / v).resolve())
            entry["label"] = "labels/" + filtered_name(entry["label"])
            new.append(entry)
        data[key] = new
    data["solf"] = {"source": str(Path(datalist).resolve()), "decisions": "decisions.csv"}
    atomic_write_text(out / "datalist.json", json.dumps(data, indent=4) + "\n")


def report(output_dir: str | Path, plots: bool = True) -> dict[str, Any]:
    """``summary.json`` and one PNG per organ (feature histograms with the thresholds); returns the summary."""
    out = Path(output_dir)
    dec = pd.read_csv(_stage_output(out, "decisions.csv", "fit"))
    thr = pd.read_csv(_stage_output(out, "thresholds.csv", "fit"))
    errs = pd.read_csv(out / "errors.csv") if (out / "errors.csv").exists() else pd.DataFrame(columns=ERROR_COLUMNS)
    rej = dec[dec["rejected"].astype(bool)] if len(dec) else dec
    summary = {
        "volumes": int(dec["volume"].nunique()) if len(dec) else 0,
        "masks": len(dec),
        "rejected": len(rej),
        "rejected_fraction": round(len(rej) / len(dec), 4) if len(dec) else 0.0,
        "volumes_dropped": int(dec.loc[dec["action"] == "drop", "volume"].nunique()) if len(dec) else 0,
        "errors": len(errs),
        "most_rejected": rej.groupby("organ").size().sort_values(ascending=False).head(5).to_dict() if len(rej) else {},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if plots and len(dec):
        _plot_organs(dec, thr, out / "plots")
    return summary


def _plot_organs(dec: pd.DataFrame, thr: pd.DataFrame, folder: Path) -> None:
    """One PNG per organ: histograms of the three features, kept vs rejected, dashed thresholds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(exist_ok=True)
    thr = thr[~cohort.partial_flags(thr)].set_index("organ_id")  # dashed lines: the whole masks' band
    for organ_id, grp in dec.groupby("organ_id"):
        # an organ the thresholds do not know (judged against a reference without it): no dashed lines
        t = thr.loc[organ_id] if organ_id in thr.index else pd.Series({"organ": grp["organ"].iloc[0], "fitted": False})
        bad = grp["rejected"].astype(bool).to_numpy()
        fig = Figure(figsize=(9, 2.6), dpi=72)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3)
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.8, wspace=0.25)
        for ax, f in zip(axes, FEATURES):
            x = grp[f].to_numpy(dtype=float)
            ax.hist([x[~bad], x[bad]], bins=20, histtype="stepfilled", color=["tab:blue", "tab:red"], alpha=0.7, label=["kept", "rejected"])
            if bool(t.get("fitted", False)):
                for v in (t[f"{f}_lo"], t[f"{f}_hi"]):
                    ax.axvline(v, color="k", ls="--", lw=1)
            ax.set_title(f, fontsize=9)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{organ_id} {t['organ']}: {int(bad.sum())}/{len(grp)} rejected (dashed: thresholds)", fontsize=10)
        with atomic_path(folder / f"{int(organ_id):02d}_{t['organ']}.png") as tmp:
            fig.savefig(tmp)


def run(
    datalist: str | Path,
    output_dir: str | Path,
    keys: Sequence[str] | str | None = None,
    eps: float = cohort.DEFAULT_EPS,
    action: str = "ignore",
    min_samples: int = cohort.DEFAULT_MIN_SAMPLES,
    use_priors: bool = False,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    body: str = "labels",
    plots: bool = True,
    partial_eps: float = cohort.DEFAULT_PARTIAL_EPS,
    gross_volume_bands: float = cohort.GROSS_VOLUME_BANDS,
    **executor: Any,
) -> dict[str, Any]:
    """All of SOLF: stage A, stage B, filtered labels, report. Returns the summary (also printed).

    ``executor``: ``workers`` / ``scheduler`` as for :func:`features`."""
    remove_temp_files(output_dir, recursive=True)  # what a killed earlier run left unpublished
    config = StageAConfig(min_fraction=min_fraction, body=body)
    stage_a = features(datalist, output_dir, keys, config, **executor)
    fit(output_dir, eps, action, min_samples, use_priors=use_priors, partial_eps=partial_eps, gross_volume_bands=gross_volume_bands)
    applied = apply(datalist, output_dir, keys, config, **executor)
    summary = {"stage_a": stage_a, "apply": applied, **report(output_dir, plots)}
    print(json.dumps(summary), flush=True)
    return summary
