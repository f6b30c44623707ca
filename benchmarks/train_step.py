"""Time of one training step of the demo's network for each Swin attention window size.

    python benchmarks/train_step.py [--windows 7 4] [--steps 7] [--threads 2]

One JSON line per window size: median seconds of a step (forward, DiceCE backward, AdamW) on one
``custom.demo.SMALL`` crop (64 x 64 x 32 voxels, feature size 12, 14 classes), after one warm-up step.
Random input: the step's cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom.demo import SMALL  # noqa: E402
from custom.labels import BTCV_NUM_CLASSES  # noqa: E402


def step_seconds(window_size: int, steps: int) -> float:
    """Median wall time of ``steps`` training steps (after one warm-up step) with Swin windows of ``window_size``^3."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=BTCV_NUM_CLASSES, feature_size=SMALL["feature_size"],
                    window_size=window_size, spatial_dims=3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    image = torch.randn(1, 1, *SMALL["roi_size"])
    label = torch.randint(0, BTCV_NUM_CLASSES, (1, 1, *SMALL["roi_size"]))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(net(image), label).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[7, 4], help="Swin window sizes (default 7 4)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per window size (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for window in args.windows:
        seconds = step_seconds(window, args.steps)
        print(json.dumps({"bench": "train_step", "window_size": window, "roi": SMALL["roi_size"],
                          "feature_size": SMALL["feature_size"], "threads": args.threads, "device": "cpu",
                          "seconds_per_step": round(seconds, 3)}), flush=True)


if __name__ == "__main__":
    main()
