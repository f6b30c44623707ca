"""ETTA under domain shift: per-organ Dice with and without ETTA on held-out real images.

The model (as in ``etta_cost.py``: the demo's BTCV checkpoint when present, else the cached
fallback trained on the sample training CT) is evaluated on the held-out real CT of btcv_sample
(``validation``: another patient, read from DICOM; cropped to the bounding box of its labelled organs
plus 8 voxels) under realistic shifts, and on the real MR of
btcv_sample (``mr``: labels mapped to BTCV, only the organs it shares):

- ``clean``: no shift;
- ``bias_field``: smooth multiplicative field (MONAI RandBiasField, degree 3, coefficients 0.3);
- ``gamma``: contrast change, intensity ** 2.0 on the [0, 1] window;
- ``noise``: additive Gaussian noise, sd 0.1 on the [0, 1] window;
- ``mr``: the real MR (percentile-scaled to [0, 1]), a modality the CT model never saw.

Arms (``--arms``), all with the same sliding window (gaussian blending): ``plain``; ``etta`` (its
defaults: K = 3, SGD lr 1e-3 momentum 0.9, tau 0.01, ``params="norm"``, unless given ``--optimizer adam``
/ ``--lr`` / ``--steps`` / ``--params`` / ``--margin`` / ``--balance`` / ``--tau`` / ``--tau_relative`` /
``--w0_floor``); ``sham`` (the same ETTA with lr 0: must equal plain); ``flip_tta`` (mean over flips along
the BTCV bundle's training flip axes 1 and 2). Labels are TotalSegmentator predictions, not manual
ground truth. Prints one JSON line per (condition, arm) and a Markdown table on stderr. Not yet the
full protocol of ``SPEC.md`` section 3 (no gate, graded severities, seeds, bootstrap intervals, HD95,
uniform / oracle candidate arms).

    python benchmarks/etta_shift.py [--model PATH] [--steps 3] [--lr 1e-3] [--arms plain,etta,sham,flip_tta]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from etta_cost import load_model, log, preprocess  # noqa: E402

from custom.etta import EntropyTTAInferer, FlipTTAInferer  # noqa: E402
from custom.labels import BTCV_LABELS, BTCV_NUM_CLASSES  # noqa: E402
from custom.sample_data import prepare  # noqa: E402


def shifted(image: torch.Tensor, condition: str, seed: int = 0) -> torch.Tensor:
    """``image`` (1, H, W, D) in [0, 1] under ``condition``."""
    from monai.transforms import RandBiasField, RandGaussianNoise

    if condition in ("clean", "mr"):
        return image
    if condition == "bias_field":
        t = RandBiasField(degree=3, coeff_range=(0.3, 0.3), prob=1.0)
        t.set_random_state(seed)
        return t(image)
    if condition == "gamma":
        return image.clamp(0, 1) ** 2.0
    if condition == "noise":
        t = RandGaussianNoise(prob=1.0, mean=0.0, std=0.1)
        t.set_random_state(seed)
        return t(image)
    raise ValueError(condition)


def organ_dice(pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Dice per BTCV organ present in ``label`` (argmax maps, same grid)."""
    out = {}
    for i in range(1, BTCV_NUM_CLASSES):
        g = label == i
        if int(g.sum()) == 0:
            continue
        p = pred == i
        out[BTCV_LABELS[i]] = float(2 * (p & g).sum() / (p.sum() + g.sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd: momentum 0.9 (the default); adam: per-parameter steps of size ~lr")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--params", choices=("norm", "affine"), default="norm")
    ap.add_argument("--margin", type=float, default=None, help="loss only on voxels with entropy < margin * log C")
    ap.add_argument("--balance", action="store_true", help="loss balanced over predicted classes")
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--tau_relative", action="store_true", help="tau in units of the spread of the candidate entropies")
    ap.add_argument("--w0_floor", type=float, default=0.0)
    ap.add_argument("--arms", default="plain,etta,sham,flip_tta")
    ap.add_argument("--conditions", default="clean,bias_field,gamma,noise,mr")
    ap.add_argument("--skip_plain", action="store_true", help="only the ETTA arm (plain results do not depend on ETTA options)")
    ap.add_argument("--train_iters", type=int, default=40)
    ap.add_argument("--roi", default=None, help="window, e.g. 64,64,64 (default: the checkpoint's, else 96^3)")
    ap.add_argument("--pixdim", default=None, help="grid in mm, e.g. 1.5,1.5,2 (default: the checkpoint's, else 1.5,1.5,2)")
    args = ap.parse_args()

    from monai.inferers import SlidingWindowInferer
    from monai.transforms import CropForegroundd

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, info = load_model(args.model, args.train_iters)
    info["roi"] = [int(v) for v in args.roi.split(",")] if args.roi else info["roi"]
    info["pixdim"] = [float(v) for v in args.pixdim.split(",")] if args.pixdim else info["pixdim"]
    net = net.to(device)
    root = prepare("btcv_sample")
    spec = json.loads((root / "dataset.json").read_text())
    pixdim = tuple(info["pixdim"])
    # evaluate on the labelled abdomen (bounding box of the organs + 8 voxels): CPU-sized, same for both arms
    crop = CropForegroundd(["image", "label"], source_key="label", select_fn=lambda v: v > 0, margin=8)
    ct = crop(preprocess(root / spec["validation"][0]["image"], pixdim, root / spec["validation"][0]["label"]))
    mr = crop(preprocess(root / spec["mr"][0]["image"], pixdim, root / spec["mr"][0]["label"], modality="mr"))
    roi = tuple(info["roi"])
    sw_kw = dict(roi_size=roi, sw_batch_size=1, overlap=args.overlap, mode="gaussian")
    etta_kw = dict(
        steps=args.steps, params=args.params, margin=args.margin, balance=args.balance, tau=args.tau,
        tau_relative=args.tau_relative, w0_floor=args.w0_floor, **sw_kw,
    )
    plain = SlidingWindowInferer(**sw_kw)
    all_arms = {
        "plain": plain,
        "etta": EntropyTTAInferer(lr=args.lr, optimizer=partial(torch.optim.Adam, lr=args.lr) if args.optimizer == "adam" else None, **etta_kw),
        "sham": EntropyTTAInferer(lr=0.0, optimizer=partial(torch.optim.Adam, lr=0.0) if args.optimizer == "adam" else None, **etta_kw),
        "flip_tta": FlipTTAInferer(plain, spatial_axes=(1, 2)),
    }
    arms = {a: all_arms[a] for a in args.arms.split(",")}
    etta_name = (
        f"etta_{args.optimizer}_lr{args.lr:g}_k{args.steps}_{args.params}"
        + (f"_margin{args.margin:g}" if args.margin is not None else "")
        + ("_balance" if args.balance else "")
        + f"_tau{args.tau:g}{'rel' if args.tau_relative else ''}"
        + (f"_floor{args.w0_floor:g}" if args.w0_floor else "")
    )
    table = []
    for cond in args.conditions.split(","):
        case = mr if cond == "mr" else ct
        x = shifted(case["image"], cond)[None].as_tensor().float().to(device)
        label = case["label"][0].as_tensor().long()
        for arm, inferer in arms.items():
            if arm == "plain" and args.skip_plain:
                continue
            log(f"{cond} / {arm}: {tuple(x.shape[2:])} voxels")
            with torch.no_grad():
                pred = inferer(x, net).argmax(1)[0].cpu()
            dice = organ_dice(pred, label)
            name = etta_name if arm == "etta" else arm
            row = {"benchmark": "etta_shift", "condition": cond, "arm": name, "model": info["source"], "mean_dice": float(np.mean(list(dice.values()))), "dice": dice}
            if arm in ("etta", "sham"):
                rec = inferer.pop_records()[0]
                row.update(entropy=[round(h, 5) for h in rec["entropy"]], weights=[round(w, 3) for w in rec["weights"]], time_s=round(rec["time_s"], 1))
            print(json.dumps(row), flush=True)
            table.append(row)
    organs = [n for n in BTCV_LABELS.values() if any(n in r["dice"] for r in table)]
    log("\n| condition | arm | mean | " + " | ".join(organs) + " |")
    log("|---|---|---|" + "---|" * len(organs))
    for r in table:
        log(f"| {r['condition']} | {r['arm']} | {r['mean_dice']:.3f} | " + " | ".join(f"{r['dice'][o]:.3f}" if o in r["dice"] else "-" for o in organs) + " |")


if __name__ == "__main__":
    main()
