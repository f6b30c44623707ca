"""``python -m custom.solf run|features|fit|apply|report|reference|qc`` (see :mod:`custom.solf.batch`).

Examples::

    python -m custom.solf run --datalist dataset.json --output_dir solf_out --workers 4
    python -m custom.solf run --datalist dataset.json --output_dir solf_out --scheduler tcp://host:8786
    python -m custom.solf fit --output_dir solf_out --eps 3 --action background   # re-decide only
    python -m custom.solf reference --datalist dataset.json -o qc_reference.json --taxonomy btcv
    python -m custom.solf qc --labels seg_folder --taxonomy totalsegmentator --output_dir qc_out [--reference FILE]
"""

from __future__ import annotations

import json

import fire

from custom.errors import cli_main
from custom.solf import batch


def _config(min_fraction: float, body: str) -> batch.StageAConfig:
    return batch.StageAConfig(min_fraction=min_fraction, body=body)


@cli_main
def features(datalist: str, output_dir: str, workers: int = 0, scheduler: str | None = None, keys=None,
             min_fraction: float = batch.DEFAULT_MIN_FRACTION, body: str = "labels") -> dict:
    """Stage A: per-volume features -> OUTPUT_DIR/features.parquet, errors.csv (resumable)."""
    return batch.features(datalist, output_dir, keys, _config(min_fraction, body), workers=workers, scheduler=scheduler)


@cli_main
def fit(output_dir: str, eps: float = batch.cohort.DEFAULT_EPS, action: str = "ignore",
        min_samples: int = batch.cohort.DEFAULT_MIN_SAMPLES, min_votes: int = 2, use_priors: bool = False,
        max_rejected: int = 3, partial_eps: float = batch.cohort.DEFAULT_PARTIAL_EPS,
        gross_volume_bands: float = batch.cohort.GROSS_VOLUME_BANDS) -> dict:
    """Stage B: thresholds.csv and decisions.csv from features.parquet (--partial_eps inf: partial organs never
    judged; --gross_volume_bands inf: the paper's 2-of-3 vote only)."""
    return batch.fit(output_dir, eps, action, min_samples, min_votes, use_priors, max_rejected, partial_eps=float(partial_eps),
                     gross_volume_bands=float(gross_volume_bands))


@cli_main
def apply(datalist: str, output_dir: str, workers: int = 0, scheduler: str | None = None, keys=None,
          min_fraction: float = batch.DEFAULT_MIN_FRACTION) -> dict:
    """Filtered label maps -> OUTPUT_DIR/labels/, and OUTPUT_DIR/datalist.json pointing at them."""
    return batch.apply(datalist, output_dir, keys, _config(min_fraction, "labels"), workers=workers, scheduler=scheduler)


@cli_main
def report(output_dir: str, plots: bool = True) -> dict:
    """summary.json and per-organ PNG plots from decisions.csv and thresholds.csv."""
    return batch.report(output_dir, plots)


@cli_main
def run(datalist: str, output_dir: str, workers: int = 0, scheduler: str | None = None, keys=None,
        eps: float = batch.cohort.DEFAULT_EPS, action: str = "ignore", min_samples: int = batch.cohort.DEFAULT_MIN_SAMPLES,
        use_priors: bool = False, min_fraction: float = batch.DEFAULT_MIN_FRACTION, body: str = "labels",
        plots: bool = True, partial_eps: float = batch.cohort.DEFAULT_PARTIAL_EPS,
        gross_volume_bands: float = batch.cohort.GROSS_VOLUME_BANDS) -> None:
    """Everything: stage A, stage B, filtered labels, report (summary printed as one JSON line)."""
    batch.run(datalist, output_dir, keys, eps, action, min_samples, use_priors, min_fraction, body, plots, float(partial_eps),
              float(gross_volume_bands), workers=workers, scheduler=scheduler)


@cli_main
def reference(datalist: str, o: str, taxonomy: str = "ukbob", work_dir: str | None = None, workers: int = 0,
              scheduler: str | None = None, keys=None, min_samples: int = batch.cohort.DEFAULT_MIN_SAMPLES, note: str = "") -> dict:
    """Cohort reference (per-organ median and 1.4826 x MAD of the three features) -> JSON file ``-o``."""
    from custom.solf.reference import build_from_datalist

    ref = build_from_datalist(datalist, o, taxonomy, work_dir, workers, scheduler, keys, min_samples, note)
    return {"reference": o, "taxonomy": ref.taxonomy, "organs": len(ref.organs),
            "fitted": sum(bool(v["fitted"]) for v in ref.organs.values()), "volumes": ref.provenance.get("volumes")}


@cli_main
def qc(labels: str, taxonomy: str, output_dir: str, reference: str | None = None, eps: float = batch.cohort.DEFAULT_EPS,
       workers: int = 0, scheduler: str | None = None, plots: bool = True) -> dict:
    """SOLF QC of a folder of label maps of any segmenter (ids mapped to UKBOB by --taxonomy)."""
    from custom.solf.qc import qc_folder

    return qc_folder(labels, taxonomy, output_dir, reference, eps, workers, scheduler, plots)


def cli() -> None:
    """Console entry point and ``python -m custom.solf``: one sub-command, its result printed as one JSON line."""
    fire.Fire({"run": run, "features": features, "fit": fit, "apply": apply, "report": report, "reference": reference, "qc": qc},
              serialize=lambda r: None if r is None else json.dumps(r))


if __name__ == "__main__":
    cli()
