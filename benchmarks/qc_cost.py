"""What ``--qc`` adds to a ``python -m custom.segment`` run on the sample CT.

Runs the command line as a user does (a fresh interpreter each time, BTCV bundle, the sample CT
``btcv_sample/images/ct_abdomen.nii.gz``, 122 x 101 x 112 voxels at 3 mm), alternating without and
with ``--qc`` so that load on the machine hits both alike, with a random-weight SwinUNETR of
``--feature-size`` (no trained weights exist here; the QC's cost does not depend on the weights, only on
the label map, which a random network makes noisier than a trained one would). Reports the median wall
time of each arm and their ratio (goal: <= 1.2), plus the QC step alone (stage A, verdicts, JSON, PNG)
timed in-process on the written label map.

    python benchmarks/qc_cost.py [--repeats 3] [--feature-size 12] [--pixdim 3]
    python benchmarks/qc_cost.py --clean-flags   # how often clean scans get an outlier verdict (no network)

``--clean-flags``: per-scan QC of clean warped scans (``custom.solf.simulate.make_subject``) against each
shipped reference: the 40 scans it was built from (seeds 7 x 100003 + i) and 20 it never saw; one JSON
line per bundle and set with the count of each verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--feature-size", type=int, default=12)
    ap.add_argument("--pixdim", type=float, default=3.0)
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--clean-flags", action="store_true", help="verdicts on clean scans instead of timing")
    args = ap.parse_args()
    if args.clean_flags:
        return clean_flags()

    import torch
    from monai.networks.nets import SwinUNETR

    from custom.sample_data import prepare

    image = prepare("btcv_sample") / "images" / "ct_abdomen.nii.gz"
    overrides = [f"feature_size={args.feature_size}", f"pixdim=[{args.pixdim},{args.pixdim},{args.pixdim}]",
                 f"roi_size=[{args.roi},{args.roi},{args.roi}]", "num_workers=0"]
    with tempfile.TemporaryDirectory(prefix="qc_cost.") as tmp:
        torch.manual_seed(0)
        ckpt = Path(tmp) / "model.pt"
        torch.save({"model": SwinUNETR(in_channels=1, out_channels=14, feature_size=args.feature_size).state_dict()}, ckpt)
        times: dict[str, list[float]] = {"plain": [], "qc": []}
        for rep in range(args.repeats):
            for arm in ("plain", "qc"):
                out = Path(tmp) / f"{arm}{rep}" / "seg.nii.gz"
                cmd = [sys.executable, "-m", "custom.segment", "-i", str(image), "-o", str(out), "--bundle", "btcv",
                       "--device", "cpu", "--model", str(ckpt), *(["--qc"] if arm == "qc" else []), "--override", *overrides]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                dt = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-2000:])
                times[arm].append(round(dt, 2))
                print(json.dumps({"bench": "qc_cost", "arm": arm, "repeat": rep, "wall_s": round(dt, 2)}), flush=True)
        step = qc_step_seconds(Path(tmp) / "plain0" / "seg.nii.gz", image)
    med = {arm: statistics.median(t) for arm, t in times.items()}
    print(json.dumps({"bench": "qc_cost", "image": image.name, "feature_size": args.feature_size, "pixdim": args.pixdim,
                      "roi": args.roi, "repeats": args.repeats, "plain_s": med["plain"], "qc_s": med["qc"],
                      "ratio": round(med["qc"] / med["plain"], 3), "qc_step_s": step, "times_s": times}), flush=True)


def qc_step_seconds(seg_file: Path, image_file: Path) -> float:
    """The QC block of ``segment --qc`` alone (reference loaded, stage A, verdicts, JSON, PNG), warm, in seconds."""
    import nibabel as nib
    import numpy as np

    from custom.solf.qc import write_case
    from custom.solf.reference import load

    ref = load(REPO / "bundles" / "swin_bob_btcv" / "models" / "qc_reference.json", "btcv")
    seg, img = nib.load(str(seg_file)), nib.load(str(image_file))
    labels, image = np.asarray(seg.dataobj), np.asarray(img.dataobj)
    best = float("inf")
    for _ in range(3):  # the first call also loads numba's cached kernels
        t0 = time.perf_counter()
        write_case(seg_file.with_name("step.nii.gz"), labels, seg.affine, ref, image, "btcv")
        best = min(best, time.perf_counter() - t0)
    return round(best, 3)


def clean_flags() -> None:
    from collections import Counter

    import nibabel as nib
    import numpy as np

    from custom.sample_data import prepare
    from custom.solf.qc import scan_qc
    from custom.solf.reference import load
    from custom.solf.simulate import make_subject

    for bundle in ("btcv", "ukbob"):
        ref = load(REPO / "bundles" / f"swin_bob_{bundle}" / "models" / "qc_reference.json", bundle)
        img = nib.load(str(prepare(f"{bundle}_sample") / "labels" / "ct_abdomen.nii.gz"))
        base = np.asarray(img.dataobj).astype(np.uint8)
        for name, seeds in (("reference cohort", [7 * 100_003 + i for i in range(40)]), ("new scans", range(5000, 5020))):
            verdicts = Counter(v["verdict"] for s in seeds for v in scan_qc(make_subject(base, s)[0], img.affine, ref)["organs"].values())
            judged = verdicts["ok"] + verdicts["outlier"]
            print(json.dumps({"bench": "qc_clean_flags", "bundle": bundle, "scans": name, **verdicts,
                              "outlier_fraction_of_judged": round(verdicts["outlier"] / judged, 4)}), flush=True)


if __name__ == "__main__":
    main()
