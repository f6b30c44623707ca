"""ETTA under graded domain shifts: the evaluation protocol of ``docs/etta.md`` ("Evaluation protocol").

1. **Source model**: ``--model PATH``, else the cached one under ``$SWIN_BOB_DATA/etta_bench/``, trained on
   first use with the demo's CPU recipe (:func:`custom.demo.train_small`: the BTCV bundle's ``train.json``
   with :data:`custom.demo.SMALL`, and the filled-stomach augmentation :data:`custom.demo.DISTEND_STOMACH`) for
   ``--train_iterations`` (default 1000, about 21 min on 2 CPU cores) on the sample CT (one patient).
2. **Gate**: plain sliding-window inference on the clean held-out CT (``validation`` of btcv_sample, the
   other patient). Below a mean Dice of ``--gate`` over liver, spleen and stomach the benchmark prints
   ``"evaluable": false`` and no gain figure: ETTA cannot be judged on a model that predicts noise.
3. **Cases**: the clean held-out CT; graded shifts of it (:data:`custom.etta.shifts.SHIFTS`: gamma 0.5 / 1.5 / 2, bias field
   0.1 / 0.2, Gaussian noise 0.05 / 0.1, contrast 0.6 / 1.5, slices 2x / 3x thicker; three seeds for the
   random ones); the real MR (``mr`` of btcv_sample, a modality the CT model never saw: a no-harm check).
4. **Arms** on the same inputs: ``plain`` (MONAI ``SlidingWindowInferer``), ``etta`` (the settings given,
   by default ``custom.etta.EntropyTTAInferer``'s defaults), ``sham`` (the same with lr 0: must equal
   plain), ``flip_tta`` (``custom.etta.FlipTTAInferer``), ``uniform`` (the unweighted mean of ETTA's
   K + 1 candidates) and ``oracle`` (the candidate with the best mean Dice: the bound of any weighting).
5. **Report**: one JSON line per (case, arm) with Dice and HD95 (mm) per organ; for ETTA the entropies
   H_0..H_K, weights and the Spearman correlation of candidate entropy and candidate Dice; one summary
   line per arm with the paired difference to plain (mean over the gate organs; bootstrap 95% interval
   over the shifted cases), wins / losses, the share of the Dice each shift costs that the arm recovers,
   and the clean and MR differences; a Markdown table on stderr.

Dice and HD95 are computed on the model's grid (labels resampled nearest), which is what the arms
change. The labels are TotalSegmentator's automatic labels, not manual ground truth. There is one
labelled patient besides the training one, so the sweep (``--sweep``) and the evaluation use the same
patient: ``--sweep`` runs on :data:`SWEEP_CASES` (the strongest severity of each shift, seed 0; 8 cases with
clean and MR), the final evaluation on every severity and all three seeds (23 cases).

    python benchmarks/etta_shift.py [--model PATH] [--train_iterations 1000] [--arms plain,etta,sham,flip_tta]
        [--optimizer adam --lr 1e-3 --steps 5 --params norm --no-intensity_curve --intensity_lr 0.1 --margin 0.4
         --balance --tau 0.01 --w0_floor 0.5]
    python benchmarks/etta_shift.py --sweep        # the settings of SWEEP, summary lines only
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from etta_cost import log, preprocess  # noqa: E402  (the same loading, windowing and grid as the cost benchmark)

from custom.etta.shifts import SHIFTS, Shift, apply_shift  # noqa: E402
from custom.labels import BTCV_LABELS, BTCV_NUM_CLASSES  # noqa: E402

GATE_ORGANS = ("liver", "spleen", "stomach")


# ------------------------------------------------------------------------------------ metrics
def organ_scores(pred: torch.Tensor, label: torch.Tensor, spacing: tuple[float, ...]) -> dict[str, tuple[float, float]]:
    """(Dice, HD95 in mm) per BTCV organ present in ``label``; ``pred``/``label`` (H, W, D) label maps on one grid.

    HD95 is NaN where the prediction misses the organ entirely.
    """
    from monai.metrics import compute_hausdorff_distance

    out = {}
    for i in range(1, BTCV_NUM_CLASSES):
        g = label == i
        if int(g.sum()) == 0:
            continue
        p = pred == i
        dice = float(2 * (p & g).sum() / (p.sum() + g.sum()))
        hd = float("nan")
        if int(p.sum()):
            hd = float(compute_hausdorff_distance(p[None, None], g[None, None], percentile=95, spacing=list(spacing))[0, 0])
        out[BTCV_LABELS[i]] = (dice, hd)
    return out


def gate_mean(scores: dict[str, tuple[float, float]]) -> float:
    return float(np.mean([scores[o][0] for o in GATE_ORGANS if o in scores]))


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` over ``n`` resamples."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, values.size, size=(n, values.size))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


# -------------------------------------------------------------------------------- the model
def source_model(model: str | None, iterations: int, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(network in eval mode, info with roi / pixdim / source) from ``model`` or the cached CPU-recipe model."""
    from custom.demo import SMALL, load_small, recipe, train_small
    from custom.sample_data import data_root

    key = hashlib.sha256(json.dumps([SMALL, recipe(distend_stomach=True)], sort_keys=True).encode()).hexdigest()[:8]  # a new recipe, a new cache file
    path = Path(model) if model else data_root() / "etta_bench" / f"btcv_small_{iterations}it_seed{seed}_{key}.pt"
    if model and not path.exists():
        raise SystemExit(f"error: {path}: no such checkpoint. Fix: give --model an existing model.pt, or leave it out")
    if not path.exists():
        log(f"training the source model with the demo's CPU recipe for {iterations} iterations -> {path} (cached for later runs)")
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON lines only
            train_small(path, iterations=iterations, seed=seed, progress_every=50, distend_stomach=True)
    net = load_small(path)
    return net.eval(), {"source": str(path), "roi": list(SMALL["roi_size"]), "pixdim": list(SMALL["pixdim"])}


# ---------------------------------------------------------------------------------- the arms
ETTA_OPTIONS = ("optimizer", "lr", "steps", "params", "intensity_curve", "intensity_lr", "margin", "balance", "tau", "tau_relative", "w0_floor")


def etta_inferer(setting: dict[str, Any], sw_kw: dict[str, Any], lr_zero: bool = False, record: bool = True):
    """An ``EntropyTTAInferer`` with the library's defaults overridden by ``setting`` (keys of :data:`ETTA_OPTIONS`);
    ``lr_zero``: the same with both learning rates 0 (sham)."""
    from custom.etta import EntropyTTAInferer

    kw = {k: v for k, v in setting.items() if k in ETTA_OPTIONS and v is not None}
    if lr_zero:
        kw["lr"] = kw["intensity_lr"] = 0.0
    return EntropyTTAInferer(record_candidates=record, **kw, **sw_kw)


def setting_name(setting: dict[str, Any]) -> str:
    return "etta" + "".join(f"_{k}{v}" if not isinstance(v, bool) else f"_{k}" if v else f"_no_{k}" for k, v in setting.items() if v is not None) if setting else "etta_defaults"


def run_case(net, x: torch.Tensor, label: torch.Tensor, spacing, arms: dict, etta_arm: str | None) -> dict[str, dict]:
    """{arm: row} for one input; ETTA's candidates give the ``uniform`` and ``oracle`` rows."""
    rows = {}
    for arm, inferer in arms.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            prob_or_logits = inferer(x, net)
        seconds = time.perf_counter() - t0
        scores = organ_scores(prob_or_logits.argmax(1)[0], label, spacing)
        row: dict[str, Any] = {"scores": scores, "gate_dice": gate_mean(scores), "time_s": round(seconds, 1)}
        if arm == etta_arm or arm == "sham":
            rec = inferer.pop_records()[0]
            row.update(entropy=[round(h, 5) for h in rec["entropy"]], weights=[round(w, 3) for w in rec["weights"]],
                       intensity_curve=rec["intensity_curve"])
            cands = rec.pop("candidates", [])
            if arm == etta_arm and cands:
                cand_scores = [organ_scores(c.argmax(1)[0], label, spacing) for c in cands]
                cand_dice = [gate_mean(s) for s in cand_scores]
                row["candidate_dice"] = [round(d, 4) for d in cand_dice]
                row["spearman_entropy_dice"] = spearman(rec["entropy"], cand_dice)
                uniform = torch.stack(cands).mean(0).argmax(1)[0]
                rows["uniform"] = {"scores": organ_scores(uniform, label, spacing)}
                rows["uniform"]["gate_dice"] = gate_mean(rows["uniform"]["scores"])
                best = int(np.argmax(cand_dice))
                rows["oracle"] = {"scores": cand_scores[best], "gate_dice": cand_dice[best], "candidate": best}
        rows[arm] = row
    return rows


def summarise(results: dict[str, dict[str, dict]], arm: str) -> dict[str, Any]:
    """Paired differences of ``arm`` to plain over the shifted cases (gate organs), bootstrap CI, wins, recovery."""
    shifted = [c for c in results if c not in ("clean", "mr")]
    diff = np.array([results[c][arm]["gate_dice"] - results[c]["plain"]["gate_dice"] for c in shifted])
    cost = np.array([results["clean"]["plain"]["gate_dice"] - results[c]["plain"]["gate_dice"] for c in shifted])
    organ_diff = [results[c][arm]["scores"][o][0] - results[c]["plain"]["scores"][o][0] for c in shifted for o in GATE_ORGANS if o in results[c]["plain"]["scores"]]
    hd = [results[c][arm]["scores"][o][1] - results[c]["plain"]["scores"][o][1] for c in shifted for o in GATE_ORGANS if o in results[c]["plain"]["scores"]]
    lo, hi = bootstrap_ci(diff)
    out = {
        "arm": arm,
        "shifted_cases": len(shifted),
        "mean_diff": round(float(diff.mean()), 4),
        "ci95": [round(lo, 4), round(hi, 4)],
        "mean_cost_of_shift": round(float(cost.mean()), 4),
        "recovered": round(float(diff.mean() / cost.mean()), 3) if cost.mean() > 0 else float("nan"),
        "wins": int((np.array(organ_diff) > 1e-3).sum()),
        "losses": int((np.array(organ_diff) < -1e-3).sum()),
        "mean_hd95_diff_mm": round(float(np.nanmean(hd)), 2) if np.isfinite(hd).any() else float("nan"),
        "clean_diff": round(results["clean"][arm]["gate_dice"] - results["clean"]["plain"]["gate_dice"], 4),
    }
    if "mr" in results:
        out["mr_diff"] = round(results["mr"][arm]["gate_dice"] - results["mr"]["plain"]["gate_dice"], 4)
    return out


#: the sweep's shifted cases: the strongest severity of each kind (both directions of gamma, lower contrast), seed 0
SWEEP_CASES = ("gamma_0.5", "gamma_2", "bias_0.2_s0", "noise_0.1_s0", "contrast_0.6", "thick_3")
# sweep: one ETTA setting per entry, the library's defaults overridden (balance and the intensity curve given in every
# entry); seed 0 of the random shifts. The input intensity curve first, then the norm-only settings swept before it existed.
_CURVE = {"optimizer": "adam", "lr": 1e-3, "steps": 3, "balance": False, "intensity_curve": True}
SWEEP: list[dict[str, Any]] = [  # most informative first: a sweep cut short still answers the main questions
    {**_CURVE, "intensity_lr": 0.05},
    {**_CURVE, "intensity_lr": 0.05, "lr": 0.0},  # the curve alone, the network's norms frozen
    {**_CURVE, "intensity_lr": 0.1},
    {**_CURVE, "intensity_lr": 0.02},
    {**_CURVE, "intensity_lr": 0.05, "steps": 5},
    {**_CURVE, "intensity_lr": 0.05, "steps": 1},
    {**_CURVE, "intensity_lr": 0.05, "w0_floor": 0.5},
    {**_CURVE, "intensity_lr": 0.05, "balance": True},
    {**_CURVE, "intensity_lr": 0.05, "params": "affine"},
    {**_CURVE, "intensity_lr": 0.2},
    {**_CURVE, "intensity_lr": 0.1, "steps": 5},
    {**_CURVE, "intensity_lr": 0.1, "w0_floor": 0.5},
    {"optimizer": "sgd", "lr": 1e-3, "steps": 3, "balance": False, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 3, "balance": False, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 3, "balance": False, "w0_floor": 0.5, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 3, "balance": False, "margin": 0.4, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 3, "balance": True, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 1, "balance": False, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 3, "balance": False, "tau": 1.0, "tau_relative": True, "intensity_curve": False},
    {"optimizer": "sgd", "lr": 1e-2, "steps": 3, "balance": False, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-4, "steps": 3, "balance": False, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 3, "balance": False, "params": "affine", "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-2, "steps": 3, "balance": False, "w0_floor": 0.5, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 5, "balance": False, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-3, "steps": 3, "balance": True, "w0_floor": 0.5, "intensity_curve": False},
    {"optimizer": "adam", "lr": 1e-4, "steps": 3, "balance": True, "intensity_curve": False},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a BTCV checkpoint of the demo's network (default: train / reuse the cached one)")
    ap.add_argument("--train_iterations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gate", type=float, default=0.7, help="minimum clean mean Dice over liver, spleen, stomach")
    ap.add_argument("--eval_on", choices=("held_out", "training_crop"), default="held_out",
                    help="held_out: the other patient (the protocol); training_crop: the 30-slice crop of the training "
                         "patient (seen anatomy: isolates the intensity shift when no model passes the gate on the other patient)")
    ap.add_argument("--arms", default="plain,etta,sham,flip_tta")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: clean, every shift, mr)")
    ap.add_argument("--sweep", action="store_true", help="run every setting of SWEEP on the strongest shifts (seed 0); summaries only")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--params", choices=("norm", "affine"), default=None)
    ap.add_argument("--intensity_curve", action=argparse.BooleanOptionalAction, default=None, help="adapt the input's intensity curve (the default), or --no-intensity_curve")
    ap.add_argument("--intensity_lr", type=float, default=None)
    ap.add_argument("--margin", type=float, default=None)
    ap.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None, help="class-balanced loss, or --no-balance (the default)")
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--tau_relative", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--w0_floor", type=float, default=None)
    args = ap.parse_args()

    from monai.inferers import SlidingWindowInferer

    from custom.demo import CONFIGS
    from custom.etta import FlipTTAInferer
    from custom.sample_data import prepare

    torch.manual_seed(args.seed)
    net, info = source_model(args.model, args.train_iterations, args.seed)
    pixdim = tuple(info["pixdim"])
    root = prepare("btcv_sample")
    spec = json.loads((root / "dataset.json").read_text())
    ct_case = spec["validation"][0] if args.eval_on == "held_out" else spec["training"][1]
    ct = preprocess(root / ct_case["image"], pixdim, root / ct_case["label"])
    mr = preprocess(root / spec["mr"][0]["image"], pixdim, root / spec["mr"][0]["label"], modality="mr")
    # the held-out CT (14 slices on the 3 mm grid) is thinner than a window: padded as the BTCV bundle pads (edge slices)
    padding_mode = json.loads((CONFIGS / "inference.json").read_text())["sliding_window_inferer"]["padding_mode"]
    sw_kw = dict(roi_size=tuple(info["roi"]), sw_batch_size=2, overlap=0.25, mode="gaussian", padding_mode=padding_mode)
    plain = SlidingWindowInferer(**sw_kw)

    # the gate
    label = ct["label"][0].as_tensor().long()
    with torch.no_grad():
        clean = organ_scores(plain(ct["image"][None].as_tensor().float(), net).argmax(1)[0], label, pixdim)
    gate = gate_mean(clean)
    header = {"benchmark": "etta_shift", "model": info["source"], "eval_on": args.eval_on, "image": ct_case["image"], "gate_dice": round(gate, 4), "gate": args.gate,
              "clean_dice": {o: round(clean[o][0], 4) for o in GATE_ORGANS if o in clean}, "evaluable": gate >= args.gate}
    print(json.dumps(header), flush=True)
    if gate < args.gate:
        log(f"not evaluable: clean mean Dice over {', '.join(GATE_ORGANS)} is {gate:.3f} < {args.gate} (the model does not segment yet)")
        return

    cases = [Shift("clean")] + [s for s in SHIFTS if not args.sweep or s.name in SWEEP_CASES] + [Shift("mr")]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted or c.kind in ("clean",)]
    single = {k: getattr(args, k) for k in ETTA_OPTIONS if getattr(args, k) is not None}
    settings = SWEEP if args.sweep else [single]
    base_arms = {"plain": plain, "flip_tta": FlipTTAInferer(plain, spatial_axes=(1, 2))}
    wanted_arms = args.arms.split(",")
    inputs = {}
    for case in cases:
        src = mr if case.kind == "mr" else ct
        inputs[case.name] = (apply_shift(src["image"], case)[None].float(), src["label"][0].as_tensor().long())

    base = {}
    for name, (x, y) in inputs.items():  # plain and flip TTA do not depend on the ETTA setting
        base[name] = run_case(net, x, y, pixdim, {a: i for a, i in base_arms.items() if a in wanted_arms or a == "plain"}, None)
    for setting in settings:
        tag = setting_name(setting)
        results = {}
        for name, (x, y) in inputs.items():
            arms = {tag: etta_inferer(setting, sw_kw)}
            if "sham" in wanted_arms and not args.sweep:
                arms["sham"] = etta_inferer(setting, sw_kw, lr_zero=True, record=False)
            rows = {**base[name], **run_case(net, x, y, pixdim, arms, tag)}
            results[name] = rows
            if not args.sweep:
                for arm, row in rows.items():
                    line = {"benchmark": "etta_shift", "eval_on": args.eval_on, "case": name, "arm": arm,
                            "dice": {o: round(d, 4) for o, (d, _) in row["scores"].items()},
                            "hd95_mm": {o: round(h, 1) for o, (_, h) in row["scores"].items()},
                            **{k: v for k, v in row.items() if k not in ("scores",)}}
                    print(json.dumps(line), flush=True)
        arms_to_sum = [tag] + ([] if args.sweep else ["uniform", "oracle"] + [a for a in ("flip_tta", "sham") if a in wanted_arms])
        for arm in arms_to_sum:
            summary = {"benchmark": "etta_shift", "eval_on": args.eval_on, "summary": arm, "setting": setting, **summarise(results, arm)}
            if arm == tag:
                rho = [r[tag].get("spearman_entropy_dice") for r in results.values()]
                summary["mean_spearman_entropy_dice"] = round(float(np.nanmean([v for v in rho if v is not None])), 3)
                summary["mean_entropy_drop"] = round(float(np.mean([r[tag]["entropy"][0] - r[tag]["entropy"][-1] for r in results.values()])), 5)
            print(json.dumps(summary), flush=True)
            log(f"| {arm} | {summary['mean_diff']:+.4f} [{summary['ci95'][0]:+.4f}, {summary['ci95'][1]:+.4f}] | "
                f"{summary['recovered']:.2f} | {summary['wins']}/{summary['losses']} | {summary['clean_diff']:+.4f} | {summary.get('mr_diff', float('nan')):+.4f} |")
        if not args.sweep:
            organs = [o for o in BTCV_LABELS.values() if o in results["clean"]["plain"]["scores"]]
            log("\n| case | arm | gate mean | " + " | ".join(organs) + " |")
            log("|---|---|---|" + "---|" * len(organs))
            for name, rows in results.items():
                for arm, row in rows.items():
                    log(f"| {name} | {arm} | {row['gate_dice']:.3f} | " + " | ".join(f"{row['scores'][o][0]:.3f}" if o in row["scores"] else "-" for o in organs) + " |")


if __name__ == "__main__":
    main()
