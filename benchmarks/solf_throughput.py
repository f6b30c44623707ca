"""SOLF stage-A throughput: volumes per second per core, and its ratio to just loading the file.

Maps measured (each a gzipped NIfTI read with nibabel, as the batch runner reads it):
- the real TotalSegmentator label maps of the sample (UKBOB ids): ``ukbob_sample/labels/*.nii.gz``;
- a UKBOB-sized map, 224 x 174 x 370 voxels at 2.23 x 2.23 x 3.0 mm with all 72 labels: the real
  abdominal map resampled onto that grid, its body filled with subcutaneous fat (a 10-voxel shell),
  muscle and inner fat, and every UKBOB id the real map lacks added as an ellipsoid of realistic
  size (a worst case for bounding boxes: three labels span the whole body).

One process (one core, OMP_NUM_THREADS=1). Prints one JSON line per map, CPU seconds (medians):
``read`` = just reading the file (nibabel, gzip inflated into an array), ``load`` = the batch
runner's validated load (read + dtype, shape, id and affine checks), ``stage_a`` = component
cleaning + all features; the ratios stage A / read and stage A / load (medians), stage A / read
of the fastest repeats (``_best``: on a shared machine the medians move with the neighbours' load);
volumes/s/core and the core-hours for 51,761 volumes (load + stage A; CPU seconds, since on a
shared machine wall time includes waiting for a core). The first stage A of a fresh checkout
compiles the numba kernels (~15 s, cached on disk): a warm-up call runs before the timings.

    python benchmarks/solf_throughput.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.labels import UKBOB_ID, UKBOB_LABELS, UKBOB_UNUSED_IDS  # noqa: E402
from custom.solf.batch import load_labels  # noqa: E402
from custom.solf.features import volume_features  # noqa: E402

DATA = Path(os.environ.get("SWIN_BOB_DATA", Path.home() / ".cache" / "swin_bob")) / "ukbob_sample"
UKBOB_SHAPE, UKBOB_SPACING = (224, 174, 370), (2.23, 2.23, 3.0)
N_UKBOB = 51_761


def ukbob_sized_map(path: Path, seed: int = 0) -> Path:
    """Write the 72-label UKBOB-sized map described in the module docstring to ``path``."""
    rng = np.random.default_rng(seed)
    src = nib.load(str(DATA / "labels" / "ct_abdomen.nii.gz"))
    real = np.asarray(src.dataobj).astype(np.uint8)
    zoom = [t / s for t, s in zip(UKBOB_SHAPE, real.shape)]
    # the real map covers the abdomen: put it in the middle third of the neck-to-knee field of view
    z0 = UKBOB_SHAPE[2] // 3
    part = ndimage.zoom(real, [zoom[0], zoom[1], zoom[2] / 3], order=0)
    labels = np.zeros(UKBOB_SHAPE, np.uint8)
    labels[: part.shape[0], : part.shape[1], z0 : z0 + part.shape[2]] = part[:, :, : UKBOB_SHAPE[2] - z0]
    idx = np.indices(UKBOB_SHAPE, dtype=np.float32)
    c = (np.array(UKBOB_SHAPE) - 1) / 2
    r = ((idx[0] - c[0]) / (0.48 * UKBOB_SHAPE[0])) ** 2 + ((idx[1] - c[1]) / (0.46 * UKBOB_SHAPE[1])) ** 2
    body = r <= 1.0
    inner = r <= 0.55
    del idx
    shell = body & ~ndimage.binary_erosion(body, iterations=10)
    free = labels == 0
    labels[free & body] = UKBOB_ID["muscle"]
    labels[free & inner] = UKBOB_ID["inner_fat"]
    labels[free & shell] = UKBOB_ID["subcutaneous_fat"]
    present = set(np.unique(labels).tolist())
    for organ in UKBOB_LABELS:
        if organ == 0 or organ in present or organ in UKBOB_UNUSED_IDS:
            continue
        semi = rng.uniform(4, 14, 3)  # voxels: 9-31 mm semi-axes
        centre = [rng.uniform(0.3, 0.7) * s for s in UKBOB_SHAPE]
        lo = [max(int(cc - a), 0) for cc, a in zip(centre, semi)]
        hi = [min(int(cc + a) + 1, s) for cc, a, s in zip(centre, semi, UKBOB_SHAPE)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        g = np.indices([b - a for a, b in zip(lo, hi)], dtype=np.float32)
        ell = sum(((g[i] + lo[i] - centre[i]) / semi[i]) ** 2 for i in range(3)) <= 1
        labels[box][ell & np.isin(labels[box], [UKBOB_ID["muscle"], UKBOB_ID["inner_fat"]])] = organ
    nib.save(nib.Nifti1Image(labels, np.diag([*UKBOB_SPACING, 1.0])), str(path))
    return path


def measure(path: Path, repeat: int) -> dict:
    """Median CPU seconds of: reading the file (nibabel, decompressed into an array), the runner's
    validated load (:func:`load_labels`: the read plus dtype/shape/id/affine checks) and stage A."""
    reads, loads, stage_a, wall = [], [], [], []
    for _ in range(repeat):
        c0 = time.process_time()
        np.asarray(nib.load(str(path)).dataobj)
        c1 = time.process_time()
        labels, affine, _ = load_labels(str(path))
        t2, c2 = time.perf_counter(), time.process_time()
        _, rows = volume_features(labels, affine, copy=False)  # as the batch runner calls it
        t3, c3 = time.perf_counter(), time.process_time()
        reads.append(c1 - c0)
        loads.append(c2 - c1)
        stage_a.append(c3 - c2)
        wall.append(t3 - t2)
    # CPU seconds (process_time) are the per-core cost; wall seconds also count waiting on a shared machine
    read_s, load_s, feat_s = (float(np.median(v)) for v in (reads, loads, stage_a))
    return {
        "shape": list(labels.shape), "organs": len(rows), "read_cpu_s": round(read_s, 4), "load_cpu_s": round(load_s, 4),
        "stage_a_cpu_s": round(feat_s, 4), "stage_a_wall_s": round(float(np.median(wall)), 4),
        "stage_a_over_read": round(feat_s / read_s, 2), "stage_a_over_load": round(feat_s / load_s, 2),
        # best of the repeats: the ratio without the shared machine's slow moments
        "stage_a_over_read_best": round(min(stage_a) / min(reads), 2),
        "volumes_per_s_per_core": round(1 / (load_s + feat_s), 3), "core_hours_51761": round(N_UKBOB * (load_s + feat_s) / 3600, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    volume_features(np.ones((3, 3, 3), np.uint8))  # warm-up: compiles (or loads) the numba kernels
    for path in sorted((DATA / "labels").glob("*.nii.gz")):
        print(json.dumps({"bench": "solf_throughput", "map": f"real:{path.name}", **measure(path, args.repeat)}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        big = ukbob_sized_map(Path(tmp) / "ukbob_sized.nii.gz")
        print(json.dumps({"bench": "solf_throughput", "map": "ukbob_sized_72_labels", **measure(big, args.repeat)}), flush=True)


if __name__ == "__main__":
    main()
