"""How well does SOLF reject wrong organ masks, per error kind, against a volume-only IQR filter?

Cohort: ``--n`` subjects (default 200) made from the real TotalSegmentator label map of the sample
CT (mapped to UKBOB ids) by random affine + smooth elastic variation (``custom.solf.simulate``).
For each error kind, ``--rate`` of the subjects (default 10%) get one organ corrupted by that kind
(the rest stay clean), stage A is measured on every subject, and both filters decide:

- SOLF: cohort robust fit (median, 1.4826 MAD) of normalised volume, sphericity and eccentricity,
  eps = 2, rejected when >= 2 of 3 features are outliers (``custom.solf.cohort``);
- IQR (the paper's baseline): per organ, organ volume (mL) outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR].

SOLF runs four times on the same tables: the default (stage A's border flag: organs within 3 voxels of
the field of view are "partial", fitted apart from whole masks and judged against the partial masks of
their organ with ``cohort.DEFAULT_PARTIAL_EPS``; and a whole mask ``cohort.GROSS_VOLUME_BANDS`` eps-bands
out in volume rejected alone), with partial masks never judged (``partial not judged``), with the 2-of-3
vote only (``2-of-3 only``), and the paper's rule (``no border``: every mask in one fit, 2-of-3 vote only).

A rejection is a true positive when the (subject, organ) mask is one the error made wrong.
Prints one JSON line per (kind, filter) with precision, recall, true/false positives, and one line
with the false-rejection rate on clean masks. ``missing`` leaves no mask to reject (recall is n/a).

    python benchmarks/solf_detection.py [--n 200] [--rate 0.1] [--workers 2] [--first-seed 0]

``--first-seed`` draws another cohort (subjects ``first_seed .. first_seed + n - 1``, other corrupted
subjects): the rule's settings were chosen on the default cohort, so a second one checks them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.solf import cohort  # noqa: E402
from custom.solf.features import volume_features  # noqa: E402
from custom.solf.simulate import ERROR_KINDS, make_subject  # noqa: E402

BASE = Path(os.environ.get("SWIN_BOB_DATA", Path.home() / ".cache" / "swin_bob")) / "ukbob_sample" / "labels" / "ct_abdomen.nii.gz"
_BASE: tuple[np.ndarray, np.ndarray] | None = None


def _base() -> tuple[np.ndarray, np.ndarray]:
    global _BASE
    if _BASE is None:
        import nibabel as nib

        img = nib.load(str(BASE))
        _BASE = (np.asarray(img.dataobj).astype(np.uint8), img.affine)
    return _BASE


def subject_rows(seed: int, kind: str | None) -> tuple[list[dict], list[int]]:
    """Stage-A rows of one subject (clean, or with one error of ``kind``) and the organs made wrong."""
    base, affine = _base()
    labels, inj = make_subject(base, seed, 1.0 if kind else 0.0, (kind,) if kind else ERROR_KINDS)
    _, rows = volume_features(labels, affine)
    vol = f"sub_{seed:04d}"
    return [{"volume": vol, **asdict(r)} for r in rows], (list(inj.organs) if inj else ([] if kind is None else None))


def iqr_reject(table: pd.DataFrame) -> pd.Series:
    q1 = table.groupby("organ_id")["volume_ml"].transform(lambda x: x.quantile(0.25))
    q3 = table.groupby("organ_id")["volume_ml"].transform(lambda x: x.quantile(0.75))
    iqr = q3 - q1
    return (table["volume_ml"] < q1 - 1.5 * iqr) | (table["volume_ml"] > q3 + 1.5 * iqr)


def score(rejected: pd.Series, truth: pd.Series) -> dict:
    tp = int((rejected & truth).sum())
    fp = int((rejected & ~truth).sum())
    pos = int(truth.sum())
    return {"tp": tp, "fp": fp, "positives": pos, "precision": round(tp / (tp + fp), 3) if tp + fp else None,
            "recall": round(tp / pos, 3) if pos else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--eps", default="2,3", help="comma-separated epsilons for SOLF (the paper's default is 2)")
    ap.add_argument("--first-seed", type=int, default=0, help="seed of the first subject (another cohort)")
    ap.add_argument("--partial_eps", type=float, default=cohort.DEFAULT_PARTIAL_EPS, help="band (robust SDs) of partial masks")
    ap.add_argument("--partial_volume_sds", type=float, default=cohort.PARTIAL_VOLUME_SDS,
                    help="extra vote for a partial mask above its organ's whole median + this many SDs (mL)")
    ap.add_argument("--gross_volume_bands", type=float, default=cohort.GROSS_VOLUME_BANDS,
                    help="a whole mask this many eps-bands out in volume is rejected alone (inf: never)")
    ap.add_argument("--cache", help="pickle of the stage-A results: read when it exists, else written (re-decide without stage A)")
    args = ap.parse_args()
    t0 = time.time()
    n_bad = max(1, round(args.rate * args.n))
    rng = np.random.default_rng(2026 + args.first_seed)
    subjects = range(args.first_seed, args.first_seed + args.n)
    bad_seeds = {kind: sorted(rng.choice(subjects, n_bad, replace=False).tolist()) for kind in ERROR_KINDS}
    jobs = [(s, None) for s in subjects] + [(s, k) for k, seeds in bad_seeds.items() for s in seeds]
    if args.cache and Path(args.cache).exists():
        results = pd.read_pickle(args.cache)
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            results = dict(zip(jobs, pool.map(subject_rows, *zip(*jobs), chunksize=4)))
        if args.cache:
            pd.to_pickle(results, args.cache)
    clean = {s: results[(s, None)][0] for s in subjects}
    for eps in (float(e) for e in str(args.eps).split(",")):
        evaluate(args, eps, bad_seeds, clean, results)
    print(json.dumps({"bench": "solf_detection", "seconds": round(time.time() - t0, 1)}), flush=True)


def evaluate(args: argparse.Namespace, eps: float, bad_seeds: dict, clean: dict, results: dict) -> None:
    all_clean_fp = []
    for kind in ERROR_KINDS:
        seeds = set(bad_seeds[kind])
        rows, wrong = [], set()
        for s in clean:
            if s in seeds:
                r, organs = results[(s, kind)]
                rows += r
                wrong |= {(f"sub_{s:04d}", o) for o in organs or []}
            else:
                rows += clean[s]
        table = pd.DataFrame(rows)
        truth = pd.Series([(v, o) in wrong for v, o in zip(table["volume"], table["organ_id"])], index=table.index)
        keys = list(zip(table["volume"], table["organ_id"]))

        def solf(t: pd.DataFrame, partial_eps: float = args.partial_eps, gross: float = args.gross_volume_bands) -> pd.Series:
            th = cohort.fit(t, eps, partial_eps=partial_eps, partial_volume_sds=args.partial_volume_sds)
            dec = cohort.decide(t, th, gross_volume_bands=gross).set_index(["volume", "organ_id"])
            return pd.Series(dec.loc[keys, "rejected"].to_numpy(dtype=bool), index=table.index)

        inf = float("inf")
        arms = {f"SOLF eps={eps:g}": solf(table), f"SOLF eps={eps:g} partial not judged": solf(table, inf),
                f"SOLF eps={eps:g} 2-of-3 only": solf(table, gross=inf),
                f"SOLF eps={eps:g} no border": solf(table.drop(columns="partial"), gross=inf),
                "IQR-volume": iqr_reject(table)}
        partial = table["partial"].to_numpy(dtype=bool)
        for name, rej in arms.items():
            print(json.dumps({"bench": "solf_detection", "kind": kind, "filter": name, "subjects": args.n,
                              "corrupted": len(seeds), "masks": len(table), "wrong_partial": int((truth & partial).sum()),
                              **score(rej, truth)}), flush=True)
        all_clean_fp.append([int((rej & ~truth).sum()) for rej in arms.values()] + [int((~truth).sum()), int((~truth & partial).sum())])
    *fps, neg, neg_partial = (sum(x) for x in zip(*all_clean_fp))
    print(json.dumps({"bench": "solf_detection", "summary": "false rejection rate of correct masks",
                      **{name: round(fp / neg, 4) for name, fp in zip(arms, fps)}, "correct_masks": neg,
                      "correct_masks_partial": neg_partial}), flush=True)


if __name__ == "__main__":
    main()
