"""ETTA cost: time and peak memory of EntropyTTAInferer against plain sliding-window inference.

On a real sample CT with a trained small Swin-UNETR (``make demo``'s ``demo_output/models/model.pt``
or a bundle training's ``bundles/swin_bob_btcv/models/model.pt`` when present, else a
feature_size-12 model trained here for a few minutes and cached),
for K = 1 and 3, in the same process:

- ``plain``: MONAI ``SlidingWindowInferer`` (no gradients);
- ``floor``: what ETTA cannot avoid, (K + 1) sliding-window forward passes plus K window-wise
  backward passes: K bare loops of (forward with gradients + backward of the mean logit) over the
  same windows (same roi, overlap, sw_batch_size), plus one plain pass;
- ``etta``: ``EntropyTTAInferer`` with the same windows.

All three arms run the network with the same attention implementation: ETTA's default
``fused_attention=True`` runs MONAI's Swin window attention through ``scaled_dot_product_attention``
(``custom.etta.fused_window_attention``), so ``plain`` and ``floor`` run inside that same context too
(``--no_fused_attention``: all three with MONAI's default attention). ``plain_default_peak_mb`` is plain
inference with the network as the bundles run it (MONAI's default attention), for reference.
The arms are repeated interleaved (plain, floor, etta, plain, floor, etta, ...) and each time is the
minimum over ``--repeats``, so a load change does not bias one arm; ``times_s`` lists every wall-clock
time, and ``cpu_time_etta_over_floor`` is the same ratio in this process's CPU time (less sensitive
to other processes on a shared machine than wall-clock time; the goal is stated in wall-clock time).

Goals: etta time <= 1.1 x floor, etta peak memory <= 1.5 x plain. Peak memory is torch's
own allocator accounting (CUDA: ``max_memory_allocated``; CPU: the profiler's allocation events),
measured in separate runs from the times (the profiler slows the run down).
Prints one JSON line per K.

    OMP_NUM_THREADS=1 python benchmarks/etta_cost.py [--model PATH] [--case ct_abdomen_crop] [--steps 1,3] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom.demo import SMALL, load_small  # noqa: E402
from custom.etta import EntropyTTAInferer, fused_window_attention, norm_affine_parameters  # noqa: E402
from custom.labels import BTCV_CT_WINDOW, BTCV_NUM_CLASSES  # noqa: E402
from custom.sample_data import data_root, prepare  # noqa: E402

BUNDLE_CKPT = REPO / "bundles" / "swin_bob_btcv" / "models" / "model.pt"  # a full bundle training (96^3, 1.5 x 1.5 x 2 mm)
DEMO_CKPT = REPO / "demo_output" / "models" / "model.pt"  # `make demo` (custom.demo.SMALL: 64 x 64 x 32 windows, 6 x 6 x 3 mm)
# fallback model: 3 mm grid, windows of 64 x 64 x 32 voxels (CPU-sized; Swin-UNETR needs multiples of 32)
FALLBACK_ROI = (64, 64, 32)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ model and data
def preprocess(path: Path, pixdim: tuple[float, ...], label: Path | None = None, modality: str = "ct") -> dict:
    """Load an image (and label), RAS, resample to ``pixdim``; CT -> BTCV window in [0, 1], MR -> percentiles in [0, 1]."""
    from monai.transforms import Compose, LoadImaged, Orientationd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd, Spacingd

    keys = ["image", "label"] if label else ["image"]
    scale = (
        ScaleIntensityRanged("image", *BTCV_CT_WINDOW, 0.0, 1.0, clip=True)
        if modality == "ct"
        else ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True)
    )
    t = Compose(
        [
            LoadImaged(keys, ensure_channel_first=True),
            Orientationd(keys, axcodes="RAS"),
            Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest")[: len(keys)]),
            scale,
        ]
    )
    d = {"image": str(path)}
    if label:
        d["label"] = str(label)
    return t(d)


def build_network(feature_size: int, in_channels: int = 1, out_channels: int = BTCV_NUM_CLASSES) -> torch.nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, spatial_dims=3)


def train_fallback(path: Path, iters: int, roi: tuple[int, ...], pixdim: tuple[float, ...], seed: int = 0) -> None:
    """A feature_size-12 Swin-UNETR trained on the two sample training CTs (same patient), DiceCE, AdamW."""
    from monai.losses import DiceCELoss
    from monai.transforms import RandCropByPosNegLabeld, SpatialPadd

    torch.manual_seed(seed)
    np.random.seed(seed)
    root = prepare("btcv_sample")
    cases = json.loads((root / "dataset.json").read_text())["training"]
    data = [preprocess(root / c["image"], pixdim, root / c["label"]) for c in cases]
    pad = SpatialPadd(["image", "label"], roi)
    crop = RandCropByPosNegLabeld(["image", "label"], "label", roi, pos=3, neg=1, num_samples=1)
    crop.set_random_state(seed)
    net = build_network(12)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-5)
    net.train()
    t0 = time.perf_counter()
    for it in range(iters):
        d = crop(pad(data[it % len(data)]))[0]
        loss = loss_fn(net(d["image"][None].as_tensor()), d["label"][None].as_tensor())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 10 == 0 or it == iters - 1:
            log(f"train fallback model: iteration {it + 1}/{iters}, DiceCE {loss.item():.3f}, {time.perf_counter() - t0:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    from custom.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"model": net.state_dict(), "feature_size": 12, "roi": list(roi), "pixdim": list(pixdim), "iters": iters}, tmp)


def load_model(model: str | None, train_iters: int = 40) -> tuple[torch.nn.Module, dict]:
    """(network in eval mode, info) from ``model``, the demo checkpoint, or the cached fallback model."""
    info: dict = {}
    path = Path(model) if model else next((p for p in (DEMO_CKPT, BUNDLE_CKPT) if p.exists()), None)
    if model and not path.exists():
        raise SystemExit(f"error: {path}: no such checkpoint. Fix: give --model an existing model.pt, or leave it out")
    if path is None:
        path = data_root() / "etta_bench" / f"swin12_btcv_{train_iters}it.pt"
        if not path.exists():
            log(f"no checkpoint at {DEMO_CKPT} or {BUNDLE_CKPT}: training a small model ({train_iters} iterations) -> {path}")
            train_fallback(path, train_iters, roi=FALLBACK_ROI, pixdim=(3.0, 3.0, 3.0))
        info["source"] = "fallback trained here"
    else:
        info["source"] = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = load_small(ckpt)
    fs = int(net.swinViT.patch_embed.proj.weight.shape[0])
    if net.swinViT.window_size[0] == SMALL["network_def#window_size"]:
        # a custom.demo.train_small model (make demo's, etta_shift.py's): the demo's windows and grid
        default_roi, default_pixdim = SMALL["roi_size"], SMALL["pixdim"]
    else:
        default_roi, default_pixdim = (96, 96, 96), (1.5, 1.5, 2.0)
    info.update(feature_size=fs, roi=list(ckpt.get("roi", default_roi)), pixdim=list(ckpt.get("pixdim", default_pixdim)))
    return net.eval(), info


# ------------------------------------------------------------------------------ measurement
def peak_memory(fn, device: torch.device) -> tuple[float, float]:
    """(seconds, peak bytes above the starting level) of ``fn()``; CPU via the profiler's allocation events."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, float(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    elapsed = time.perf_counter() - t0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return elapsed, float(peak)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def window_backward_pass(net: torch.nn.Module, x: torch.Tensor, inferer: EntropyTTAInferer) -> None:
    """One bare pass over the inferer's windows: forward with gradients on the parameters ETTA adapts (with
    ``params="norm"`` the identity affines added to affine-less norms too; with ``intensity_curve`` the input's
    curve, so the backward reaches the image), backward, nothing else."""
    from custom.etta import IntensityCurve, WindowPlan, added_norm_affines

    plan = WindowPlan(x, inferer.roi_size, inferer.overlap, inferer.mode, inferer.sigma_scale, inferer.padding_mode, inferer.cval, x.device, x.device)
    flags = [(p, p.requires_grad) for p in net.parameters()]
    use_amp = x.device.type == "cuda"
    curve = IntensityCurve.from_volume(x).to(x.device) if inferer.intensity_curve else torch.nn.Identity()
    with added_norm_affines(net) if inferer.params == "norm" else contextlib.nullcontext():
        params = norm_affine_parameters(net)  # the added affines are the layers' weight / bias here
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        try:
            for start in range(0, len(plan.slices), inferer.sw_batch_size):
                win = plan.window(range(start, min(start + inferer.sw_batch_size, len(plan.slices))))
                with torch.enable_grad(), torch.autocast("cuda", enabled=use_amp):
                    net(curve(win)).float().mean().backward()
        finally:
            for p, f in flags:
                p.requires_grad_(f)
                p.grad = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the demo's, else a fallback trained here)")
    ap.add_argument("--case", default="ct_abdomen_crop", help="image of btcv_sample/images (default: the 30-slice real CT)")
    ap.add_argument("--steps", default="1,3")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--sw_batch_size", type=int, default=1)
    ap.add_argument("--train_iters", type=int, default=40)
    ap.add_argument("--roi", default=None, help="window, e.g. 64,64,64 (default: the checkpoint's, else 96^3)")
    ap.add_argument("--pixdim", default=None, help="grid in mm, e.g. 1.5,1.5,2 (default: the checkpoint's, else 1.5,1.5,2)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the timed arms (the minimum is kept)")
    ap.add_argument("--no_fused_attention", action="store_true", help="all arms with MONAI's default window attention")
    ap.add_argument("--params", choices=("norm", "affine"), default="norm", help="ETTA's adapted parameters (default: the inferer's default)")
    ap.add_argument("--intensity_curve", action=argparse.BooleanOptionalAction, default=True, help="ETTA adapts the input's intensity curve (default)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net, info = load_model(args.model, args.train_iters)
    info["roi"] = [int(v) for v in args.roi.split(",")] if args.roi else info["roi"]
    info["pixdim"] = [float(v) for v in args.pixdim.split(",")] if args.pixdim else info["pixdim"]
    net = net.to(device)
    root = prepare("btcv_sample")
    x = preprocess(root / "images" / f"{args.case}.nii.gz", tuple(info["pixdim"]))["image"][None].as_tensor().to(device)
    roi = tuple(info["roi"])
    fused = not args.no_fused_attention
    sw_kw = dict(roi_size=roi, sw_batch_size=args.sw_batch_size, overlap=args.overlap, mode="gaussian")
    from monai.inferers import SlidingWindowInferer

    plain = SlidingWindowInferer(**sw_kw)

    def run_plain() -> None:
        with torch.no_grad(), fused_window_attention(net, fused):
            plain(x, net)

    with torch.no_grad():
        plain(x, net)  # warm-up (allocator, kernels)
        _, m_plain_default = peak_memory(lambda: plain(x, net), device)
    run_plain()
    _, m_plain = peak_memory(run_plain, device)
    for k in [int(s) for s in args.steps.split(",")]:
        etta = EntropyTTAInferer(steps=k, fused_attention=fused, params=args.params, intensity_curve=args.intensity_curve, **sw_kw)

        def run_floor_backward() -> None:
            with fused_window_attention(net, fused):
                for _ in range(k):
                    window_backward_pass(net, x, etta)

        def run_etta() -> None:
            with torch.no_grad():
                etta(x, net)

        load = [os.getloadavg()[0]]
        times: dict[str, list[float]] = {"plain": [], "backward": [], "etta": []}
        cpu: dict[str, list[float]] = {"plain": [], "backward": [], "etta": []}
        for _ in range(args.repeats):  # interleaved
            for arm, fn in (("plain", run_plain), ("backward", run_floor_backward), ("etta", run_etta)):
                wall, cpu_s = timed(fn, device)
                times[arm].append(wall)
                cpu[arm].append(cpu_s)
            load.append(os.getloadavg()[0])
        _, m_etta = peak_memory(run_etta, device)
        t_plain, t_etta = min(times["plain"]), min(times["etta"])
        t_floor = min(times["backward"]) + t_plain
        c_floor = min(cpu["backward"]) + min(cpu["plain"])
        rec = etta.pop_records()[-1]
        print(
            json.dumps(
                {
                    "benchmark": "etta_cost",
                    "device": device.type,
                    "model": info["source"],
                    "feature_size": info["feature_size"],
                    "case": args.case,
                    "shape": list(x.shape[2:]),
                    "roi": list(roi),
                    "overlap": args.overlap,
                    "sw_batch_size": args.sw_batch_size,
                    "windows": rec["windows"],
                    "steps": k,
                    "fused_attention": fused,
                    "params": args.params,
                    "intensity_curve": args.intensity_curve,
                    "repeats": args.repeats,
                    "plain_s": round(t_plain, 2),
                    "floor_s": round(t_floor, 2),
                    "etta_s": round(t_etta, 2),
                    "time_etta_over_floor": round(t_etta / t_floor, 3),
                    "time_etta_over_plain": round(t_etta / t_plain, 3),
                    "cpu_time_etta_over_floor": round(min(cpu["etta"]) / c_floor, 3),
                    "plain_peak_mb": round(m_plain / 2**20, 1),
                    "etta_peak_mb": round(m_etta / 2**20, 1),
                    "mem_etta_over_plain": round(m_etta / m_plain, 3),
                    "plain_default_peak_mb": round(m_plain_default / 2**20, 1),
                    "mem_etta_over_plain_default": round(m_etta / m_plain_default, 3),
                    "times_s": {a: [round(t, 2) for t in v] for a, v in times.items()},
                    "entropy": [round(h, 5) for h in rec["entropy"]],
                    "threads": torch.get_num_threads(),
                    "load_avg_1min": [round(v, 2) for v in load],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
