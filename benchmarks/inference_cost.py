"""Inference cost on whole-volume inputs: time split and peak memory of a bundle's inference pipeline.

Two volumes, each resampled from the real sample CT so that the anatomy is real and the size is that of
the target data:
- UKBOB-sized: 4 Dixon-like channels, 224 x 174 x 370 at 2.23 x 2.23 x 3.0 mm (the UKBOB bundle's own
  grid), 73 classes, ``swin_bob_ukbob``;
- CT-sized: 1 channel, 512 x 512 x 300 at 0.75 x 0.75 x 1.2 mm, 14 classes, ``swin_bob_btcv`` (resampled
  to its 1.5 x 1.5 x 2.0 mm model grid and back).

Three runs per volume, each in a fresh process (its own peak RSS):
- ``bundle``: the bundle's ``inference.json`` as shipped (streaming sliding window, labels decided on
  the model grid, nearest-neighbour inversion of a uint8 map);
- ``previous``: the pipeline the bundles used before (MONAI ``SlidingWindowInferer`` stitching the
  whole C-channel map, softmax, bilinear inversion of the probabilities, argmax);
- ``bare``: the network forward over the same windows, as the bundle runs it (fused window attention),
  and nothing else (the floor).
Each prints a JSON line (seconds for load + pre-processing / network / stitching and post-processing /
write, peak RSS, peak CUDA memory on a GPU); then one line per volume compares the labels of ``bundle``
and ``previous`` (fraction of identical voxels, per-organ Dice for organs over 1 mL).

    python benchmarks/inference_cost.py [--feature-size 12] [--overlap 0] [--sw-batch-size N] [--only ukbob|btcv] [--ckpt-btcv FILE]

Weights: a seeded random SwinUNETR unless a checkpoint is given (labels of random weights are
fragmented, the hardest case for label agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOLUMES = {  # bundle -> (sample image, shape, spacing mm, input channels, classes)
    "ukbob": ("ukbob_sample", (224, 174, 370), (2.23, 2.23, 3.0), 4, 73),
    "btcv": ("btcv_sample", (512, 512, 300), (0.75, 0.75, 1.2), 1, 14),
}
BUNDLE_DIRS = {"ukbob": "swin_bob_ukbob", "btcv": "swin_bob_btcv"}


def make_volume(bundle: str, folder: Path) -> Path:
    """The real sample CT (or its Dixon-like channels) resampled onto a whole-body / CT-sized grid."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import zoom

    from custom.sample_data import prepare

    sample, shape, spacing, channels, _ = VOLUMES[bundle]
    src = nib.load(prepare(sample) / "images" / "ct_abdomen.nii.gz")
    data = np.asarray(src.dataobj, dtype=np.float32)
    data = data if data.ndim == 4 else data[..., None]
    factors = [n / s for n, s in zip(shape, data.shape[:3])]
    out = np.stack([zoom(data[..., c], factors, order=1) for c in range(channels)], axis=-1)
    out = out[..., 0].astype(np.int16) if channels == 1 else out
    path = folder / f"{bundle}_sized.nii.gz"
    nib.save(nib.Nifti1Image(out, np.diag([*spacing, 1.0])), path)
    return path


def previous_pipeline(overlap: float) -> dict:
    """``inference.json`` overrides that restore the pipeline before streaming (for comparison)."""
    return {
        "etta_inferer#buffer_dtype": "float32",  # the UKBOB config takes it from the streaming inferer
        "sliding_window_inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size",
                                   "sw_batch_size": "@sw_batch_size", "overlap": overlap, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
             "writer": "custom.transforms.AtomicNibabelWriter"},
        ]},
    }


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints its JSON line."""
    import torch
    from monai.data import decollate_batch, list_data_collate
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from custom.attention import fused_window_attention
    from custom.predict import BundlePredictor, BundleSpec

    cuda = torch.cuda.is_available()
    overrides = {"feature_size": args.feature_size, "sliding_window_inferer#overlap": args.overlap, "amp": cuda}
    if args.sw_batch_size:
        overrides["sw_batch_size"] = args.sw_batch_size
    if args.run == "previous":
        overrides.update(previous_pipeline(args.overlap))
    elif args.buffer_dtype:
        overrides["sliding_window_inferer#buffer_dtype"] = args.buffer_dtype
    spec = BundleSpec(str(REPO / "bundles" / BUNDLE_DIRS[args.bundle]), args.ckpt, "cuda:0" if cuda else "cpu",
                      overrides=tuple(overrides.items()))
    predictor = BundlePredictor(spec, args.out)
    network_s = [0.0]

    def tic(*_):
        torch.cuda.synchronize() if cuda else None
        network_s.append(time.perf_counter())

    def toc(*_):
        torch.cuda.synchronize() if cuda else None
        network_s[0] += time.perf_counter() - network_s.pop()

    predictor.network.register_forward_pre_hook(tic)
    predictor.network.register_forward_hook(toc)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    batch = list_data_collate([predictor.preprocessing({"image": args.image})])
    image = batch["image"].to(predictor.device)
    t1 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", enabled=predictor.amp):
        if args.run == "bare":  # the windows through the network as the bundle runs it (fused attention)
            roi, sw = predictor.inferer.roi_size, predictor.inferer.sw_batch_size
            size = image.shape[2:]
            windows = dense_patch_slices(size, roi, _get_scan_interval(size, roi, 3, [args.overlap] * 3))
            with fused_window_attention(predictor.network):
                for i in range(0, len(windows), sw):
                    predictor.network(torch.cat([image[(slice(None), slice(None), *w)] for w in windows[i : i + sw]]))
        else:
            batch["pred"] = predictor.inferer(image, predictor.network)
    t2 = time.perf_counter()
    if args.run != "bare":
        for item in decollate_batch(batch, detach=True):
            predictor.postprocessing(item)
    t3 = time.perf_counter()
    print(json.dumps({
        "benchmark": "inference_cost", "bundle": args.bundle, "run": args.run, "shape": list(image.shape[1:]),
        "load_pre_s": round(t1 - t0, 2), "network_s": round(network_s[0], 2),
        "stitch_s": round(t2 - t1 - network_s[0], 2), "post_write_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "device": str(predictor.device), "feature_size": args.feature_size, "overlap": args.overlap,
        "sw_batch_size": predictor.inferer.sw_batch_size, "threads": torch.get_num_threads(),
        "buffer_dtype": str(getattr(predictor.inferer, "buffer_dtype", "")).removeprefix("torch.") or None,
    }), flush=True)


def agreement(bundle: str, new: Path, old: Path) -> dict:
    import nibabel as nib
    import numpy as np

    a, b = (np.asarray(nib.load(p).dataobj) for p in (new, old))
    voxel_ml = float(np.prod(VOLUMES[bundle][2])) / 1000.0
    dice = {}
    for organ in map(int, np.union1d(np.unique(a), np.unique(b))):
        if organ == 0:
            continue
        ma, mb = a == organ, b == organ
        if max(ma.sum(), mb.sum()) * voxel_ml > 1.0:
            dice[organ] = round(2.0 * float((ma & mb).sum()) / float(ma.sum() + mb.sum()), 4)
    return {"benchmark": "inference_cost", "bundle": bundle, "compare": "bundle vs previous",
            "identical_voxels": round(float((a == b).mean()), 5), "organs_over_1ml": len(dice),
            "min_dice": min(dice.values()) if dice else None,
            "organs_below_0.98": {k: v for k, v in dice.items() if v < 0.98}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feature-size", type=int, default=12)
    parser.add_argument("--overlap", type=float, default=0.0)
    parser.add_argument("--sw-batch-size", type=int, default=0, help="windows per forward (default: the bundle's)")
    parser.add_argument("--only", choices=sorted(VOLUMES))
    parser.add_argument("--ckpt-ukbob", default="")
    parser.add_argument("--ckpt-btcv", default="")
    parser.add_argument("--runs", default="bundle,previous,bare")
    parser.add_argument("--buffer-dtype", default="", help="stitching buffer of the bundle run (default: the bundle's)")
    # one run of a child process
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return worker(args)

    import torch
    from monai.networks.nets import SwinUNETR

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for bundle in [args.only] if args.only else list(VOLUMES):
            _, _, _, channels, classes = VOLUMES[bundle]
            image = make_volume(bundle, tmp)
            ckpt = getattr(args, f"ckpt_{bundle}")
            if not ckpt:
                torch.manual_seed(0)
                ckpt = str(tmp / f"{bundle}.pt")
                torch.save({"model": SwinUNETR(in_channels=channels, out_channels=classes, feature_size=args.feature_size).state_dict()}, ckpt)
            outputs = {}
            for run in args.runs.split(","):
                out = tmp / f"{bundle}_{run}"
                out.mkdir()
                cmd = [sys.executable, __file__, "--run", run, "--bundle", bundle, "--image", str(image), "--ckpt", ckpt,
                       "--out", str(out), "--feature-size", str(args.feature_size), "--overlap", str(args.overlap),
                       "--sw-batch-size", str(args.sw_batch_size), "--buffer-dtype", args.buffer_dtype]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    sys.exit(f"{bundle} {run} failed:\n{proc.stderr[-3000:]}")
                print(proc.stdout.strip().splitlines()[-1], flush=True)
                outputs[run] = next(out.glob("*_seg.nii.gz"), None)
            if outputs.get("bundle") and outputs.get("previous"):
                print(json.dumps(agreement(bundle, outputs["bundle"], outputs["previous"])), flush=True)


if __name__ == "__main__":
    main()
