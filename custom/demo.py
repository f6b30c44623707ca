"""``make demo``: the BTCV bundle end to end on the real sample CT, in about ten CPU minutes.

Steps (each a small function of the shared :class:`Demo` state, run in the order of :data:`STEPS`):

1. ``data``: the checksummed sample data (``custom.sample_data``; the Makefile already built it).
2. ``train``: ``bundles/swin_bob_btcv/configs/train.json`` through ``monai.bundle.ConfigWorkflow``,
   from scratch, with the CPU recipe (:data:`SMALL`, :data:`TRAIN_SMALL`: feature size 12, Swin windows of 4^3, 6 x 6 x 3 mm
   voxels, 64 x 64 x 32 crops that span the abdomen's cross-section, AdamW lr 3e-3 with the bundle's cosine
   schedule over the iteration budget, 1000 by default) and the filled-stomach augmentation (:data:`DISTEND_STOMACH`);
   the final weights are saved by a MONAI ``CheckpointSaver``.
3. ``infer``: ``inference.json`` on the held-out CT (``ct_dicom``, another patient) -> label NIfTI
   in the input's space.
4. ``overlay``: PNG of image / reference / prediction (``custom.visualize``).
5. ``report``: per-organ volume and Dice against the reference labels (TotalSegmentator's automatic labels).
6. ``solf``: SOLF on the UKBOB sample's automatic labels.
7. ``shift``: the held-out CT under a contrast shift (``custom.etta.shifts``), segmented plain, with flip
   TTA (``--use_tta true``) and with ETTA (``--use_etta true``): Dice per organ for each.

Usage: ``python -m custom.demo [--iterations 1000] [--no-distend_stomach] [--out demo_output]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from custom.labels import BTCV_CT_WINDOW, BTCV_LABELS

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_bob_btcv"
CONFIGS = BUNDLE / "configs"
#: the demo's network and sampling: small enough for a 2-core CPU, same pipeline as the bundle. Swin windows of
#: 4^3 tokens instead of 7^3 (``network_def#window_size``, a bundle config override): a training step takes 1.1 s
#: instead of 2.9 s on 2 cores (``benchmarks/train_step.py``), most of it having been attention over 343-token windows
SMALL = {"feature_size": 12, "network_def#window_size": 4, "roi_size": [64, 64, 32], "pixdim": [6.0, 6.0, 3.0],
         "num_workers": 0, "sw_batch_size": 2}
STOMACH = next(i for i, name in BTCV_LABELS.items() if name == "stomach")  # its BTCV id, for DISTEND_STOMACH
#: the CPU training recipe: overrides of train.json on top of SMALL: one crop per step, 30x the bundle's rate
#: (minutes, not days), no validation, stronger augmentation; ``epochs`` is set by :func:`train_small` from its budget
TRAIN_SMALL: dict[str, Any] = {
    "learning_rate": 3e-3, "num_samples": 1, "warmup_epochs": 5, "val_interval": 10**9, "ckpt_interval": 10**9,
    # one training patient: without spatial and intensity augmentation the network learns that patient
    # (Dice 0.97 on it, 0.13 over liver / spleen / stomach on the other after 600 iterations). Thin z-slabs
    # padded back to the window with their edge slices, as the bundles' inferers pad, teach it inputs like the
    # 40 mm held-out series.
    "train#random_transforms": [
        {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label", "spatial_size": "@roi_size",
         "pos": 1, "neg": 1, "num_samples": "@num_samples", "image_key": "image", "image_threshold": 0},
        {"_target_": "RandAffined", "keys": ["image", "label"], "prob": 0.8, "rotate_range": [0.1, 0.1, 0.3], "scale_range": [0.2, 0.2, 0.2],
         "translate_range": [6, 6, 3], "mode": ["bilinear", "nearest"], "padding_mode": "zeros"},
        {"_target_": "RandSpatialCropd", "keys": ["image", "label"], "roi_size": [64, 64, 8], "max_roi_size": "@roi_size", "random_size": True},
        {"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": "@roi_size", "mode": "@padding_mode"},
        {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.3, "gamma": [0.7, 1.5]},
        {"_target_": "RandGaussianNoised", "keys": "image", "prob": 0.2, "std": 0.03},
        {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.3},
        {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5},
    ],
}


#: for budgets of ~1000 iterations (``make demo``, ``benchmarks/etta_shift.py``): the training stomach is collapsed, the held-out
#: one filled (a wall around a darker lumen); 80 % of the crops grow it by 6-24 mm into unlabelled tissue and paint
#: it filled (lumen -26..101 HU, wall 38..165 HU after the CT window). Inserted after the crop by :func:`recipe`.
#: It needs the long schedule: over 400 iterations it costs the spleen more than it gives the stomach (docs/etta.md)
DISTEND_STOMACH: dict[str, Any] = {
    "_target_": "custom.augment.RandDistendOrgand", "keys": "image", "label_key": "label", "organs": [STOMACH], "prob": 0.8,
    "radius": [1, 4], "lumen": [0.35, 0.65], "wall": [0.5, 0.8],
}


#: ``train.json``'s per-iteration loss logging and training accuracy: nobody sees them in :func:`train_small`, which
#: prints its own progress; without them an iteration is 6 % faster and the weights are bit for bit the same
PER_ITERATION_LOGGING = ("StatsHandler", "TensorBoardStatsHandler")


def recipe(distend_stomach: bool = True) -> dict[str, Any]:
    """:data:`TRAIN_SMALL` without the per-iteration logging and accuracy (:data:`PER_ITERATION_LOGGING`), with
    :data:`DISTEND_STOMACH` after the crop when ``distend_stomach``."""
    import json

    handlers = json.loads((CONFIGS / "train.json").read_text())["train"]["handlers"]
    out = {**TRAIN_SMALL, "train#key_metric": None, "train#postprocessing": None}
    out.update({f"train#handlers#{i}#_disabled_": True for i, h in enumerate(handlers) if h["_target_"] in PER_ITERATION_LOGGING})
    if distend_stomach:
        steps = list(out["train#random_transforms"])
        out["train#random_transforms"] = steps[:1] + [DISTEND_STOMACH] + steps[1:]
    return out


@dataclass
class Demo:
    """What the steps share: settings in, paths and results out."""

    out: Path
    iterations: int = 1000
    distend_stomach: bool = True  # train_small's recipe
    dataset_dir: Path | None = None
    ckpt_dir: Path | None = None
    held_out: dict[str, str] = field(default_factory=dict)
    prediction: Path | None = None
    dice: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


def _say(msg: str, file: Any = None) -> None:
    print(f"[demo] {msg}", file=file, flush=True)


def _quietly(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``fn(**kwargs)`` with its log records, warnings and prints held back (a bundle run's INFO lines, MONAI's
    config notice, reader notices); shown on stderr only when it fails, so the demo prints its own lines."""
    import contextlib
    import io
    import warnings

    held = io.StringIO()
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            warnings.simplefilter("ignore")
            return fn(**kwargs)
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    finally:
        logging.disable(disabled)


def step_data(demo: Demo) -> None:
    from custom.sample_data import prepare

    demo.dataset_dir = prepare("btcv_sample")
    import json

    datalist = json.loads((demo.dataset_dir / "dataset.json").read_text())
    case = datalist["validation"][0]
    demo.held_out = {k: str(demo.dataset_dir / v) for k, v in case.items()}
    _say(f"data: {demo.dataset_dir} ({len(datalist['training'])} training CTs, held-out {Path(case['image']).name})")


def train_small(ckpt: Path, iterations: int, seed: int = 0, progress_every: int = 20, dataset_dir: Path | None = None,
                distend_stomach: bool = True) -> dict[str, float]:
    """Train the BTCV bundle's ``train.json`` with the CPU recipe (:data:`SMALL` + :func:`recipe`) for ``iterations``.

    From scratch on the sample training CT (``dataset_dir``, default btcv_sample), one crop per
    iteration, the bundle's warm-up + cosine schedule stretched over exactly ``iterations`` (so the rate
    has decayed when training stops); the final network is written atomically to ``ckpt`` as
    ``{"model": state_dict}`` (MONAI ``CheckpointSaver``). One progress line every ``progress_every``
    iterations. ``distend_stomach``: add :data:`DISTEND_STOMACH` (default; ``False`` for budgets of a few hundred
    iterations, where it costs the spleen more than it gives the stomach). Returns ``{"iterations", "minutes"}``.
    """
    import json
    import math

    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow
    from monai.utils import set_determinism

    from custom.handlers import AtomicCheckpointSaver
    from custom.sample_data import prepare

    set_determinism(seed)
    dataset_dir = Path(dataset_dir or prepare("btcv_sample"))
    n_train = len(json.loads((dataset_dir / "dataset.json").read_text())["training"])  # iterations per epoch (batch 1)
    ckpt = Path(ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    wf = _quietly(
        ConfigWorkflow, config_file=str(CONFIGS / "train.json"), workflow_type="train", logging_file=False,
        bundle_root=str(BUNDLE), dataset_dir=str(dataset_dir), ckpt_dir=str(ckpt.parent),
        output_dir=str(ckpt.parent / "train_logs"), epochs=math.ceil(iterations / n_train), **recipe(distend_stomach), **SMALL,
    )
    _quietly(wf.initialize)  # parsing, the dataset cache's progress bar
    trainer = _quietly(wf.parser.get_parsed_content, id="train#trainer")  # builds the datasets: their progress bars
    network = wf.parser.get_parsed_content("network")
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iterations), lambda engine: engine.terminate())
    start = time.time()
    console = sys.stdout  # the progress lines go here while the run's own output is held back

    @trainer.on(Events.ITERATION_COMPLETED(every=max(1, progress_every)))
    def _progress(engine) -> None:
        loss = engine.state.output[0]["loss"] if isinstance(engine.state.output, list) else engine.state.output["loss"]
        _say(f"train: iteration {engine.state.iteration:4d} of {iterations}, {(time.time() - start) / 60:4.1f} min, loss {float(loss):.3f}", console)

    AtomicCheckpointSaver(save_dir=str(ckpt.parent), save_dict={"model": network}, save_final=True, final_filename=ckpt.name).attach(trainer)
    torch.manual_seed(seed)
    # the bundle's per-iteration StatsHandler lines and the dataset's progress bars: _progress says enough
    _quietly(wf.run)
    _quietly(wf.finalize)
    return {"iterations": trainer.state.iteration, "minutes": (time.time() - start) / 60}


def swin_unetr_args(state: dict[str, "torch.Tensor"]) -> dict[str, int]:
    """``SwinUNETR`` arguments that rebuild the network of a state dict: channels, feature size, Swin window.

    Read from the weights' shapes: the patch embedding is ``(feature_size, in_channels, 2, 2, 2)``, the output
    convolution ``(out_channels, feature_size, 1, 1, 1)`` and a relative position bias table has
    ``(2 * window - 1)^3`` rows.
    """
    embed = state["swinViT.patch_embed.proj.weight"]
    table_rows = state["swinViT.layers1.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    return {
        "in_channels": int(embed.shape[1]), "out_channels": int(state["out.conv.conv.weight"].shape[0]),
        "feature_size": int(embed.shape[0]), "window_size": (round(table_rows ** (1 / 3)) + 1) // 2, "spatial_dims": 3,
    }


def load_small(ckpt: Path | dict) -> "torch.nn.Module":
    """The SwinUNETR of ``ckpt`` (a :func:`train_small` checkpoint, any ``{"model": state_dict}`` or a state dict; a
    path or what ``torch.load`` returned) with its weights; the architecture is read from the weights
    (:func:`swin_unetr_args`), so checkpoints of earlier recipes load too."""
    import torch
    from monai.networks.nets import SwinUNETR

    state = ckpt if isinstance(ckpt, dict) else torch.load(ckpt, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    net = SwinUNETR(**swin_unetr_args(state))
    net.load_state_dict(state)
    return net


def step_train(demo: Demo) -> None:
    demo.ckpt_dir = demo.out / "models"
    _say(f"train: SwinUNETR (feature size {SMALL['feature_size']}, Swin windows of {SMALL['network_def#window_size']}^3 tokens) "
         f"from scratch on the sample CT, {demo.iterations} iterations ({SMALL['pixdim'][0]:g} x {SMALL['pixdim'][1]:g} x "
         f"{SMALL['pixdim'][2]:g} mm voxels, {'x'.join(map(str, SMALL['roi_size']))} crops, AdamW lr {TRAIN_SMALL['learning_rate']:g}"
         f"{', filled-stomach augmentation' if demo.distend_stomach else ''})")
    done = train_small(demo.ckpt_dir / "model.pt", demo.iterations, dataset_dir=demo.dataset_dir, distend_stomach=demo.distend_stomach)
    demo.results["train_minutes"], demo.results["train_iterations"] = done["minutes"], done["iterations"]
    _say(f"train: {done['iterations']} iterations in {done['minutes']:.1f} min -> {demo.ckpt_dir / 'model.pt'}")


def _infer(demo: Demo, image: str | Path, output_dir: Path, **flags: Any) -> None:
    """The BTCV bundle's ``inference.json`` with the demo's model on ``image`` (``flags``: e.g. ``use_etta``), quietly."""
    from monai.bundle import run

    _quietly(run, config_file=str(CONFIGS / "inference.json"), logging_file=str(CONFIGS / "logging.conf"),
             bundle_root=str(BUNDLE), input_path=str(image), ckpt_dir=str(demo.ckpt_dir), output_dir=str(output_dir),
             **flags, **SMALL)


def step_infer(demo: Demo) -> None:
    pred_dir = demo.out / "predictions"
    _say(f"infer: {demo.held_out['image']} (sliding window, overlap 0.5, gaussian)")
    _infer(demo, demo.held_out["image"], pred_dir)
    name = Path(demo.held_out["image"]).name.removesuffix(".nii.gz")
    demo.prediction = pred_dir / f"{name}_seg.nii.gz"
    _say(f"infer: wrote {demo.prediction}")


def step_overlay(demo: Demo) -> None:
    import nibabel as nib

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


def _print_dice_table(columns: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per-organ Dice, one column per arm (organs in the reference only); returns each arm's mean."""
    names = list(columns)
    first = columns[names[0]]
    print("\norgan                          " + "".join(f"{n:>14}" for n in names))
    for organ, d in first.items():
        if not np.isnan(d):
            print(f"{organ:<30} " + "".join(f"{columns[n][organ]:14.3f}" for n in names))
    means = {n: float(np.nanmean(list(columns[n].values()))) for n in names}
    print(f"{'mean':<30} " + "".join(f"{means[n]:14.3f}" for n in names) + "\n")
    return means


def step_shift(demo: Demo) -> None:
    """The held-out CT under a contrast shift (gamma 2 inside the CT window), then plain, flip TTA and ETTA."""
    import nibabel as nib

    from custom.etta.shifts import Shift, apply_shift_hu

    shift = Shift("gamma", 2.0)
    image = nib.load(demo.held_out["image"])
    shifted = demo.out / "shifted" / Path(demo.held_out["image"]).name
    shifted.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(apply_shift_hu(np.asarray(image.dataobj, dtype=np.float32), shift, BTCV_CT_WINDOW), image.affine, image.header), shifted)
    _say(f"shift: the held-out CT with {shift.name} (intensities inside the CT window raised to the power 2: darker soft tissue) "
         f"-> {shifted}; inference.json plain, --use_tta true (mean over flips), --use_etta true (entropy TTA, custom.etta defaults)")
    ref = np.asarray(nib.load(demo.held_out["label"]).dataobj)
    columns = {}
    for arm, flags in (("plain", {}), ("flip TTA", {"use_tta": True}), ("ETTA", {"use_etta": True})):
        out = demo.out / f"predictions_shift_{arm.split()[0].lower()}"
        start = time.time()
        _infer(demo, shifted, out, **flags)
        pred = np.asarray(nib.load(out / demo.prediction.name).dataobj)
        columns[arm] = organ_dice(pred, ref, dict(BTCV_LABELS))
        _say(f"shift: {arm} in {time.time() - start:.0f} s -> {out / demo.prediction.name}")
    means = _print_dice_table({"clean": demo.dice, "shift": columns["plain"], "shift+flipTTA": columns["flip TTA"], "shift+ETTA": columns["ETTA"]})
    demo.results["shift_mean_dice"] = means


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


STEPS: list[Callable[[Demo], None]] = [step_data, step_train, step_infer, step_overlay, step_report, step_solf, step_shift]


def main(argv: list[str] | None = None) -> Demo:
    parser = argparse.ArgumentParser(prog="python -m custom.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=Demo.iterations,
                        help="training iterations (default 1000: 9-10 min on 2 CPU cores; 400 without the stomach augmentation "
                             "finds liver and spleen in 4-6 min)")
    parser.add_argument("--distend_stomach", action=argparse.BooleanOptionalAction, default=Demo.distend_stomach,
                        help="train with the filled-stomach augmentation (custom.demo.DISTEND_STOMACH; default on)")
    parser.add_argument("--out", type=Path, default=REPO / "demo_output", help="output folder (default demo_output/)")
    args = parser.parse_args(argv)
    demo = Demo(out=args.out.resolve(), iterations=args.iterations, distend_stomach=args.distend_stomach)
    demo.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for i, step in enumerate(STEPS, 1):
        _say(f"step {i}/{len(STEPS)}: {step.__name__.removeprefix('step_')}")
        step(demo)
    _say(f"done in {(time.time() - start) / 60:.1f} min; outputs in {demo.out}")
    return demo


if __name__ == "__main__":
    from custom.errors import exit_on_input_error

    exit_on_input_error(main)
