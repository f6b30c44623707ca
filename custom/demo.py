"""``make demo``: the BTCV bundle end to end on the real sample CT, in a few CPU minutes.

Steps (each a small function of the shared :class:`Demo` state, run in the order of :data:`STEPS`):

1. ``data``: the checksummed sample data (``custom.sample_data``; the Makefile already built it).
2. ``train``: ``bundles/swin_bob_btcv/configs/train.json`` through ``monai.bundle.ConfigWorkflow``,
   from scratch, with a small network (feature size 12, 64^3 patches, 3 mm voxels) for a bounded
   time (ignite ``TimeLimit``, learning rate 1e-3); the final weights are saved by a MONAI
   ``CheckpointSaver``.
3. ``infer``: ``inference.json`` on the held-out CT (``ct_dicom``, another patient) -> label NIfTI
   in the input's space.
4. ``overlay``: PNG of image / reference / prediction (``custom.visualize``).
5. ``report``: per-organ Dice against the reference labels (TotalSegmentator's automatic labels).
- ``etta`` (last): the same inference with ``--use_etta true``; per-organ Dice without and with ETTA.

Usage: ``python -m custom.demo [--minutes 5] [--out demo_output]``. Later steps (SOLF, ETTA) are
added by appending a function to :data:`STEPS`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_bob_btcv"
CONFIGS = BUNDLE / "configs"
#: the demo's network and sampling: small enough for a 2-core CPU, same pipeline as the bundle
SMALL = {"feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [3.0, 3.0, 3.0], "num_workers": 0, "sw_batch_size": 2}


@dataclass
class Demo:
    """What the steps share: settings in, paths and results out."""

    out: Path
    minutes: float = 5.0
    etta_steps: int = 1
    dataset_dir: Path | None = None
    ckpt_dir: Path | None = None
    held_out: dict[str, str] = field(default_factory=dict)
    prediction: Path | None = None
    dice: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def step_data(demo: Demo) -> None:
    from custom.sample_data import prepare

    demo.dataset_dir = prepare("btcv_sample")
    import json

    datalist = json.loads((demo.dataset_dir / "dataset.json").read_text())
    case = datalist["validation"][0]
    demo.held_out = {k: str(demo.dataset_dir / v) for k, v in case.items()}
    _say(f"data: {demo.dataset_dir} ({len(datalist['training'])} training CTs, held-out {Path(case['image']).name})")


def step_train(demo: Demo) -> None:
    from ignite.engine import Events
    from ignite.handlers import TimeLimit
    from monai.bundle import ConfigWorkflow
    from monai.handlers import CheckpointSaver

    demo.ckpt_dir = demo.out / "models"
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(BUNDLE), dataset_dir=str(demo.dataset_dir), ckpt_dir=str(demo.ckpt_dir),
        output_dir=str(demo.out / "train_logs"), epochs=1000, warmup_epochs=1, val_interval=10**6, num_samples=2,
        learning_rate=1e-3, **SMALL,  # 10x the bundle's rate: minutes, not days, of training
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(limit_sec=int(demo.minutes * 60)))
    network = wf.parser.get_parsed_content("network")
    CheckpointSaver(save_dir=str(demo.ckpt_dir), save_dict={"model": network}, save_final=True, final_filename="model.pt").attach(trainer)
    _say(f"train: SwinUNETR (feature size 12) from scratch for {demo.minutes:g} min on CPU; one line per iteration")
    start = time.time()
    wf.run()
    wf.finalize()
    demo.results["train_minutes"] = (time.time() - start) / 60
    demo.results["train_iterations"] = trainer.state.iteration
    _say(f"train: {trainer.state.iteration} iterations ({trainer.state.epoch} epochs) in {demo.results['train_minutes']:.1f} min "
         f"-> {demo.ckpt_dir / 'model.pt'}")


def step_infer(demo: Demo) -> None:
    from monai.bundle import run

    pred_dir = demo.out / "predictions"
    _say(f"infer: {demo.held_out['image']} (sliding window, overlap 0.5, gaussian)")
    run(
        config_file=str(CONFIGS / "inference.json"), logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(BUNDLE),
        input_path=demo.held_out["image"], ckpt_dir=str(demo.ckpt_dir), output_dir=str(pred_dir), **SMALL,
    )
    name = Path(demo.held_out["image"]).name.removesuffix(".nii.gz")
    demo.prediction = pred_dir / f"{name}_seg.nii.gz"
    _say(f"infer: wrote {demo.prediction}")


def step_overlay(demo: Demo) -> None:
    import nibabel as nib

    from custom.labels import BTCV_CT_WINDOW
    from custom.visualize import save_overlay_png

    image = nib.load(demo.held_out["image"])
    png = save_overlay_png(
        demo.out / "overlay.png", np.asarray(image.dataobj), np.asarray(nib.load(demo.prediction).dataobj),
        np.asarray(nib.load(demo.held_out["label"]).dataobj), taxonomy="btcv", affine=image.affine,
        window=BTCV_CT_WINDOW, title="held-out CT",
    )
    _say(f"overlay: wrote {png}")


def organ_dice(pred: np.ndarray, ref: np.ndarray, labels: dict[int, str]) -> dict[str, float]:
    """Dice per organ (NaN when the reference lacks the organ), with MONAI's DiceMetric."""
    import torch
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    n = max(labels) + 1
    p = one_hot(torch.as_tensor(pred.astype(np.int64))[None, None], n)
    r = one_hot(torch.as_tensor(ref.astype(np.int64))[None, None], n)
    values = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, r)[0].tolist()
    return {labels[i]: float(v) for i, v in zip(range(1, n), values)}


def step_report(demo: Demo) -> None:
    import nibabel as nib

    from custom.labels import BTCV_LABELS

    pred = np.asarray(nib.load(demo.prediction).dataobj)
    ref = np.asarray(nib.load(demo.held_out["label"]).dataobj)
    demo.dice = organ_dice(pred, ref, dict(BTCV_LABELS))
    spacing = abs(np.linalg.det(nib.load(demo.held_out["label"]).affine[:3, :3]))  # mm^3 per voxel
    print("\norgan                          ref mL   pred mL   Dice")
    for organ_id, name in list(BTCV_LABELS.items())[1:]:
        ref_ml, pred_ml = (ref == organ_id).sum() * spacing / 1000, (pred == organ_id).sum() * spacing / 1000
        d = demo.dice[name]
        print(f"{name:<30} {ref_ml:7.1f}  {pred_ml:8.1f}   {'  -  ' if np.isnan(d) else f'{d:.3f}'}")
    present = [v for v in demo.dice.values() if not np.isnan(v)]
    demo.results["mean_dice"] = float(np.mean(present)) if present else float("nan")
    print(f"{'mean over organs in the reference':<48} {demo.results['mean_dice']:.3f}\n")
    _say("reference = TotalSegmentator's automatic labels mapped to BTCV ids (not manual ground truth)")


def step_etta(demo: Demo) -> None:
    """The same inference with ``--use_etta true`` (custom.etta): Dice per organ without and with ETTA."""
    import nibabel as nib
    from monai.bundle import run

    from custom.labels import BTCV_LABELS

    pred_dir = demo.out / "predictions_etta"
    _say(f"etta: inference.json --use_etta true, K = {demo.etta_steps} entropy steps (SGD lr 1e-3) on every norm layer's "
         "scale and shift (LayerNorm affines, identity affines added to the InstanceNorms), entropy-weighted candidates; "
         "one 'ETTA volume' log line")
    start = time.time()
    run(
        config_file=str(CONFIGS / "inference.json"), logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(BUNDLE),
        input_path=demo.held_out["image"], ckpt_dir=str(demo.ckpt_dir), output_dir=str(pred_dir), use_etta=True,
        **{"etta_inferer#steps": demo.etta_steps}, **SMALL,
    )
    demo.results["etta_minutes"] = (time.time() - start) / 60
    pred = np.asarray(nib.load(pred_dir / demo.prediction.name).dataobj)
    ref = np.asarray(nib.load(demo.held_out["label"]).dataobj)
    dice = organ_dice(pred, ref, dict(BTCV_LABELS))
    print("\norgan                          Dice     Dice + ETTA")
    for name, d in demo.dice.items():
        if not np.isnan(d):
            print(f"{name:<30} {d:.3f}    {dice[name]:.3f}")
    present = [v for v in dice.values() if not np.isnan(v)]
    demo.results["mean_dice_etta"] = float(np.mean(present)) if present else float("nan")
    print(f"{'mean':<30} {demo.results['mean_dice']:.3f}    {demo.results['mean_dice_etta']:.3f}\n")
    _say(f"etta: {demo.results['etta_minutes']:.1f} min, wrote {pred_dir / demo.prediction.name}")


def step_solf(demo: Demo) -> None:
    """SOLF (``custom.solf``) on the UKBOB sample's automatic labels: the report summary and rejected masks."""
    import pandas as pd

    from custom.sample_data import prepare
    from custom.solf import batch

    out = demo.out / "solf"
    _say(f"solf: stage A on every ukbob_sample label map, then the cohort rule (eps 2, >= 2 of 3 features); "
         f"3 volumes are no cohort, so min_samples 2; reports in {out}")
    summary = batch.run(prepare("ukbob_sample") / "dataset.json", out, workers=2, min_samples=2)
    dec = pd.read_csv(out / "decisions.csv")
    print("\nvolume                               organ                          outliers  action")
    for row in dec[dec["rejected"]].itertuples():
        print(f"{row.volume:<36} {row.organ:<30} {row.outliers:>8}  {row.action}")
    demo.results["solf_rejected"] = summary["rejected"]
    _say(f"solf: {summary['rejected']} of {summary['masks']} organ masks rejected; thresholds.csv, "
         f"decisions.csv, plots/ and filtered labels/ in {out}")


STEPS: list[Callable[[Demo], None]] = [step_data, step_train, step_infer, step_overlay, step_report, step_solf, step_etta]


def main(argv: list[str] | None = None) -> Demo:
    parser = argparse.ArgumentParser(prog="python -m custom.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    parser.add_argument("--out", type=Path, default=REPO / "demo_output", help="output folder (default demo_output/)")
    parser.add_argument("--etta_steps", type=int, default=1, help="ETTA steps K in the last step (method default 3; 1 keeps the demo short)")
    args = parser.parse_args(argv)
    demo = Demo(out=args.out.resolve(), minutes=args.minutes, etta_steps=args.etta_steps)
    demo.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for i, step in enumerate(STEPS, 1):
        _say(f"step {i}/{len(STEPS)}: {step.__name__.removeprefix('step_')}")
        step(demo)
    _say(f"done in {(time.time() - start) / 60:.1f} min; outputs in {demo.out}")
    return demo


if __name__ == "__main__":
    from custom.io import exit_on_input_error

    exit_on_input_error(main)
