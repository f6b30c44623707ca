"""Per-scan quality control of organ masks against a cohort reference (``docs/qc.md``).

For every organ of one label map: SOLF stage-A features (:func:`custom.solf.features.volume_features`,
after the same component cleaning), each feature's robust z-score against the reference
(:mod:`custom.solf.reference`), the eps rule and the 2-of-3 vote (:func:`custom.solf.cohort.decide`),
the connected-component count against the expected range of :mod:`custom.labels`, and the partial
flag (the mask reaches within 3 voxels of the field-of-view border: its shape is not judged).

Verdict per organ: ``outlier`` (>= ``min_votes`` features beyond eps, or a whole organ's normalised
volume alone beyond 3 bands, ``gross_volume``; or a partial organ whose
volume in mL is above :data:`PARTIAL_TOO_LARGE` x the whole organs' median, ``partial_too_large``: a
cut can only remove volume), ``partial`` (shape not judged), ``no_reference`` (the reference has too few whole masks of
that organ) or ``ok``; ``components_ok`` is reported beside it. :func:`write_case` writes ``<stem>_qc.json`` and ``<stem>_qc.png`` (flagged organs on the image).
:class:`custom.solf.transforms.SOLFQCd` runs the same from a bundle's ``inference.json``, and
``python -m custom.solf qc --labels FOLDER --taxonomy ...`` judges a folder of any segmenter's maps.

NumPy and pandas only at import time (the PNG imports Matplotlib when drawn).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from custom.atomic import atomic_path, atomic_write_text, check_writable_dir
from custom.checks import check_readable
from custom.errors import InputError
from custom.labels import TO_UKBOB, UKBOB_COMPONENT_RANGES, UKBOB_LABELS, expected_components, to_ukbob
from custom.solf import cohort
from custom.solf.features import BORDER_MARGIN, DEFAULT_MIN_FRACTION, FEATURES, volume_features
from custom.solf.reference import CohortReference

FORMAT = "swin-bob-qc"
VERSION = 1
VERDICTS = ("ok", "outlier", "partial", "no_reference")
#: a partial organ above this multiple of the whole organs' median volume (mL) is an outlier: a cut only
#: removes volume. A factor, not a band of robust SDs: the organs the field of view holds whole are the
#: smaller ones, so the whole organs' spread understates the cohort's (measured on the sample cohort)
PARTIAL_TOO_LARGE = 1.5


def _round(v: Any, nd: int = 6) -> Any:
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else round(float(v), nd)
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    return v


def scan_qc(
    labels: np.ndarray,
    affine: np.ndarray | None,
    reference: CohortReference,
    taxonomy: str | None = None,
    eps: float = cohort.DEFAULT_EPS,
    min_votes: int = 2,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> dict[str, Any]:
    """QC of one label map against ``reference``.

    Args:
        labels: integer label map ``(H, W, D)`` (a leading channel of 1 is accepted) in ``taxonomy`` ids.
        affine: 4x4 voxel -> mm matrix (features are in mm / mL).
        reference: the cohort reference; it must come from label maps of the same taxonomy.
        taxonomy: key of :data:`custom.labels.TO_UKBOB` (default: the reference's).
        eps, min_votes: the cohort rule (robust SDs; features that must be outliers).

    Returns:
        ``{"format", "version", "taxonomy", "eps", "min_votes", "border_margin_voxels", "reference",
        "summary": {verdict: [organ names], "components_out_of_range": [...]}, "organs": {name: {...}}}``.
        Per organ: ``label_id`` (in ``taxonomy``), ``organ_id`` (UKBOB), ``voxels``, ``volume_ml``, the
        features, ``z_<feature>`` (robust z-score), ``out_<feature>``, ``outliers``, ``partial``,
        ``partial_too_large``, ``components``, ``expected_components`` ``[min, max]``, ``components_ok``, ``verdict``.
    """
    taxonomy = taxonomy or reference.taxonomy
    if taxonomy not in TO_UKBOB:
        raise InputError(None, f"unknown taxonomy {taxonomy!r}", f"use one of {', '.join(sorted(TO_UKBOB))}")
    if taxonomy != reference.taxonomy:
        raise InputError(None, f"the reference was built from {reference.taxonomy} labels, these labels are {taxonomy}",
                         f"use a reference built from {taxonomy} label maps")
    arr = np.asarray(labels)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    _, rows = volume_features(to_ukbob(arr, taxonomy), affine, None, UKBOB_LABELS, UKBOB_COMPONENT_RANGES, min_fraction)
    back = {u: t for t, u in TO_UKBOB[taxonomy].items()}  # UKBOB id -> first id of the source taxonomy
    table = pd.DataFrame([{"volume": "scan", **r.__dict__} for r in rows])
    thr = reference.thresholds(eps)
    organs: dict[str, dict[str, Any]] = {}
    summary: dict[str, list[str]] = {v: [] for v in VERDICTS} | {"components_out_of_range": []}
    if len(table):
        dec = cohort.decide(table, thr, min_votes=min_votes).set_index("organ_id")
        med = thr.set_index("organ_id")
        for r in rows:
            d = dec.loc[r.organ_id]
            entry: dict[str, Any] = {"label_id": int(back.get(r.organ_id, r.organ_id)), "organ_id": r.organ_id,
                                     "voxels": r.voxels, "volume_ml": r.volume_ml}
            fitted = r.organ_id in med.index and bool(med.loc[r.organ_id, "fitted"])
            for f in FEATURES:
                entry[f] = getattr(r, f)
                sd = med.loc[r.organ_id, f"{f}_sd"] if fitted else float("nan")
                entry[f"z_{f}"] = (getattr(r, f) - med.loc[r.organ_id, f"{f}_median"]) / sd if fitted and sd > 0 else float("nan")
                entry[f"out_{f}"] = bool(d[f"out_{f}"])
            rng = expected_components(r.organ_id)
            entry.update(outliers=int(d["outliers"]), gross_volume=bool(d["gross_volume"]), partial=r.partial, components=r.components_before,
                         expected_components=[rng.min_count, rng.max_count],
                         components_ok=rng.min_count <= r.components_before <= rng.max_count)
            # a cut organ can only be smaller than whole: above the whole organs' volume band it is wrong anyway
            # (in mL: the normalised volume of a cut organ also grows when the scan holds less body)
            o = reference.organs.get(r.organ_id, {})
            too_large = bool(r.partial and fitted and r.volume_ml > PARTIAL_TOO_LARGE * float(o.get("volume_ml_median", np.nan)))
            entry["partial_too_large"] = bool(too_large)
            if too_large:
                verdict = "outlier"
            else:
                verdict = "partial" if r.partial else "no_reference" if not fitted else "outlier" if bool(d["rejected"]) else "ok"
            entry["verdict"] = verdict
            summary[verdict].append(r.organ)
            if not entry["components_ok"]:
                summary["components_out_of_range"].append(r.organ)
            organs[r.organ] = {k: _round(v) for k, v in entry.items()}
    return {
        "format": FORMAT, "version": VERSION, "taxonomy": taxonomy, "eps": eps, "min_votes": min_votes,
        "border_margin_voxels": BORDER_MARGIN, "reference": dict(reference.provenance), "summary": summary, "organs": organs,
    }


def flagged_organs(qc: Mapping[str, Any]) -> dict[int, str]:
    """``{label_id: reason}`` of the organs a reader should look at: outliers and wrong component counts."""
    out = {}
    for name, o in qc["organs"].items():
        reasons = (["outlier"] if o["verdict"] == "outlier" else []) + ([f"{o['components']} components"] if not o["components_ok"] else [])
        if reasons:
            out[int(o["label_id"])] = f"{name}: " + ", ".join(reasons)
    return out


def save_qc_png(path: str | Path, qc: Mapping[str, Any], labels: np.ndarray, image: np.ndarray | None = None,
                affine: np.ndarray | None = None, title: str = "") -> Path:
    """PNG of the flagged organs: two panels on the axial slice where they are largest, all organs (left)
    and the flagged ones only (right), in the colours of :func:`custom.visualize.label_colors`.

    ``labels``: ``(H, W, D)`` in the QC's taxonomy ids; ``image``: ``(H, W, D)`` or ``(C, H, W, D)``
    on the same grid (first channel shown; a blank picture when ``None``). Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from custom.visualize import label_colors, pick_slice, render_slice, to_display_volume

    lab = to_display_volume(np.asarray(labels).reshape(np.shape(labels)[-3:]), affine, is_label=True)
    img = np.zeros(lab.shape, np.float32) if image is None else to_display_volume(np.asarray(image).reshape((-1, *lab.shape))[0], affine)
    flagged = flagged_organs(qc)
    only = np.where(np.isin(lab, list(flagged)), lab, 0)
    index = pick_slice(only if only.any() else None, lab)
    colors = label_colors(max(int(lab.max(initial=0)), max(flagged, default=0)) + 1)
    fig = Figure(figsize=(8.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, vol, name in zip(axes, (lab, only), ("all organs", "flagged" if flagged else "flagged: none")):
        ax.imshow(render_slice(img, vol, index, colors), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    text = "; ".join(flagged.values()) or "no organ flagged"
    partial = qc["summary"].get("partial", [])
    if partial:
        text += f"\npartial (cut by the field of view, not judged): {', '.join(partial)}"
    fig.text(0.5, 0.02, text, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.suptitle(f"{title}  QC, axial slice {index}/{lab.shape[2] - 1}  (R on the left)".strip(), fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.15, wspace=0.05)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def qc_paths(output: str | Path) -> tuple[Path, Path]:
    """``seg.nii.gz`` -> (``seg_qc.json``, ``seg_qc.png``) beside it."""
    output = Path(output)
    name = output.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(f"{name}_qc.json"), output.with_name(f"{name}_qc.png")


def write_case(output: str | Path, labels: np.ndarray, affine: np.ndarray | None, reference: CohortReference,
               image: np.ndarray | None = None, taxonomy: str | None = None, eps: float = cohort.DEFAULT_EPS,
               png: bool = True, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`scan_qc` of one case, written as ``<output stem>_qc.json`` (+ ``_qc.png``); returns the QC dict."""
    qc = scan_qc(labels, affine, reference, taxonomy, eps)
    qc.update(extra or {})
    json_path, png_path = qc_paths(output)
    atomic_write_text(json_path, json.dumps(qc, indent=1) + "\n")
    if png:
        save_qc_png(png_path, qc, labels, image, affine, title=Path(output).name.split(".")[0])
    return qc


def flag_table(cases: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Cohort table of flags: one row per organ, one column per verdict (+ ``components_out_of_range``),
    counts over ``cases`` (``{case: qc dict}``)."""
    rows = [{"case": case, "organ": name, "verdict": o["verdict"], "components_ok": o["components_ok"]}
            for case, qc in cases.items() for name, o in qc["organs"].items()]
    if not rows:
        return pd.DataFrame(columns=["organ", *VERDICTS, "components_out_of_range"])
    t = pd.DataFrame(rows)
    out = pd.crosstab(t["organ"], t["verdict"]).reindex(columns=list(VERDICTS), fill_value=0)
    out["components_out_of_range"] = (~t["components_ok"].astype(bool)).groupby(t["organ"]).sum().astype(int)
    return out.reset_index()


def qc_folder(labels_dir: str | Path, taxonomy: str, output_dir: str | Path, reference: str | Path | None = None,
              eps: float = cohort.DEFAULT_EPS, workers: int = 0, scheduler: str | None = None, plots: bool = True,
              patterns: Sequence[str] = ("*.nii.gz", "*.nii")) -> dict[str, Any]:
    """SOLF QC of a folder of label maps from any segmenter (``python -m custom.solf qc``).

    The maps' ids are mapped to UKBOB ids through :data:`custom.labels.TO_UKBOB` (by ``taxonomy``), stage A
    runs through the SOLF runner, and stage B either fits the folder as a cohort or, with ``reference``,
    judges every map against that file. Writes the runner's report files in ``output_dir``
    (``features.parquet``, ``thresholds.csv``, ``decisions.csv``, ``errors.csv``, ``summary.json``,
    ``plots/``) plus the ``datalist.json`` it made from the folder. Returns the summary.
    """
    from custom.solf import batch
    from custom.solf.reference import load

    if taxonomy not in TO_UKBOB:
        raise InputError(None, f"--taxonomy {taxonomy!r} is not known", f"use one of {', '.join(sorted(TO_UKBOB))}")
    folder = check_readable(labels_dir)
    if not folder.is_dir():
        raise InputError(folder, "is not a folder", "give the folder that holds the label maps (--labels FOLDER)")
    files = sorted({p.absolute() for pat in patterns for p in folder.glob(pat)})
    if not files:
        raise InputError(folder, "holds no .nii.gz / .nii label map", "give the folder of a segmenter's label maps")
    ref = load(reference, taxonomy) if reference else None
    out = check_writable_dir(output_dir)
    datalist = out / "datalist_in.json"
    atomic_write_text(datalist, json.dumps({"name": f"qc of {folder}", "training": [{"label": str(p)} for p in files]}, indent=1))
    stage_a = batch.features(datalist, out, None, batch.StageAConfig(taxonomy=taxonomy), workers=workers, scheduler=scheduler)
    batch.fit(out, eps, reference=ref)
    summary = {"stage_a": stage_a, "taxonomy": taxonomy, "reference": str(reference) if reference else None, **batch.report(out, plots)}
    return summary
