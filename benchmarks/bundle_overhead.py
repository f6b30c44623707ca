"""Bundle overhead: ``inference.json`` through ``monai.bundle.run`` vs the same pipeline written by hand.

Both load the same checkpoint into the same SwinUNETR, read the sample CT, apply the same transforms
(load, RAS, resample, CT window), run the same sliding-window inferer, invert the resampling, take
the argmax and write a NIfTI. Runs alternate (bundle, hand, bundle, hand, ...) so that load on the
machine hits both alike; the median of each is reported. Goal: ratio <= 1.05.

Prints one JSON line per run and a summary line:
    python benchmarks/bundle_overhead.py [--repeats 3] [--feature-size 12] [--roi 64] [--pixdim 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "swin_bob_btcv" / "configs"


def hand_written(image: str, ckpt: Path, out_dir: Path, feature_size: int, roi: int, pixdim: float, device: torch.device) -> Path:
    """The inference pipeline of ``inference.json`` as a plain MONAI script."""
    import numpy as np
    from monai.data import decollate_batch, list_data_collate
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SwinUNETR
    from monai.transforms import (
        Activationsd, AsDiscreted, Compose, EnsureTyped, Invertd, LoadImaged, Orientationd, SaveImaged,
        ScaleIntensityRanged, Spacingd,
    )

    from custom.labels import BTCV_CT_WINDOW, BTCV_NUM_CLASSES

    net = SwinUNETR(in_channels=1, out_channels=BTCV_NUM_CLASSES, feature_size=feature_size).to(device)
    net.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
    net.eval()
    pre = Compose([
        LoadImaged("image", ensure_channel_first=True),
        Orientationd("image", axcodes="RAS", labels=None),
        Spacingd("image", pixdim=[pixdim] * 3, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=BTCV_CT_WINDOW[0], a_max=BTCV_CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped("image"),
    ])
    post = Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted("pred", argmax=True),
        SaveImaged("pred", output_dir=str(out_dir), output_postfix="seg", output_dtype=np.uint8, resample=False,
                   separate_folder=False, writer="custom.transforms.AtomicNibabelWriter"),
    ])
    inferer = SlidingWindowInferer([roi] * 3, sw_batch_size=4, overlap=0.5, mode="gaussian")
    batch = list_data_collate([pre({"image": image})])  # what the bundle's DataLoader does
    with torch.no_grad():
        batch["pred"] = inferer(batch["image"].to(device), net)
    for item in decollate_batch(batch):
        post(item)
    return out_dir


def bundle(image: str, ckpt_dir: Path, out_dir: Path, feature_size: int, roi: int, pixdim: float) -> Path:
    from monai.bundle import run

    run(
        config_file=str(CONFIGS / "inference.json"), bundle_root=str(CONFIGS.parent), input_path=image,
        ckpt_dir=str(ckpt_dir), output_dir=str(out_dir), feature_size=feature_size, roi_size=[roi] * 3,
        pixdim=[pixdim] * 3, sw_batch_size=4, num_workers=0,
    )
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--feature-size", type=int, default=12)
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--pixdim", type=float, default=3.0)
    parser.add_argument("--image", default="")
    args = parser.parse_args()

    import logging

    logging.disable(logging.INFO)  # the bundle's per-run logging would otherwise time console output too
    from monai.networks.nets import SwinUNETR

    from custom.labels import BTCV_NUM_CLASSES
    from custom.sample_data import prepare

    image = args.image or str(prepare("btcv_sample") / "images" / "ct_abdomen.nii.gz")
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        (tmp / "models").mkdir()
        net = SwinUNETR(in_channels=1, out_channels=BTCV_NUM_CLASSES, feature_size=args.feature_size)
        torch.save(net.state_dict(), tmp / "models" / "model.pt")
        times: dict[str, list[float]] = {"bundle": [], "hand": []}
        # one untimed warm-up of each (first-call costs: reader plug-ins, kernels)
        for i in range(args.repeats + 1):
            for kind in ("bundle", "hand"):
                out = tmp / f"{kind}_{i}"
                start = time.perf_counter()
                if kind == "bundle":
                    bundle(image, tmp / "models", out, args.feature_size, args.roi, args.pixdim)
                else:
                    hand_written(image, tmp / "models" / "model.pt", out, args.feature_size, args.roi, args.pixdim, device)
                elapsed = time.perf_counter() - start
                if i > 0:
                    times[kind].append(elapsed)
                    print(json.dumps({"benchmark": "bundle_overhead", "run": kind, "repeat": i, "seconds": round(elapsed, 3)}), flush=True)
        bundle_s, hand_s = statistics.median(times["bundle"]), statistics.median(times["hand"])
        print(json.dumps({
            "benchmark": "bundle_overhead", "image": Path(image).name, "device": str(device),
            "feature_size": args.feature_size, "roi": args.roi, "pixdim_mm": args.pixdim, "repeats": args.repeats,
            "bundle_median_s": round(bundle_s, 3), "hand_median_s": round(hand_s, 3), "ratio": round(bundle_s / hand_s, 3),
            "goal_ratio": 1.05, "torch_threads": torch.get_num_threads(),
        }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
