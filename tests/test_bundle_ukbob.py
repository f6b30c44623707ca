"""bundles/swin_bob_ukbob: metadata, SOLF through `monai.bundle run configs/solf.json`, one tiny epoch,
evaluation and inference.

The sample is real anatomy (TotalSegmentator CTs and their automatic labels, mapped to UKBOB ids)
with 4 Dixon-like channels derived from CT: UKBOB-shaped, not UK Biobank data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from bundle_helpers import bundle_workflow

from custom.export_bundle import DEFAULT_SCHEMA as SCHEMA

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_bob_ukbob"
CONFIGS = BUNDLE / "configs"
#: tiny settings: feature_size 12, 64^3 crops and windows (SwinUNETR needs 64 to train), 4 mm voxels
TINY = {"network_def#feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [4.0, 4.0, 4.0], "sw_batch_size": 1}


workflow = partial(bundle_workflow, "swin_bob_ukbob", **TINY)


def test_metadata_matches_the_label_table() -> None:
    from custom.labels import DIXON_CHANNELS, UKBOB_LABELS, sync_metadata

    meta = json.loads((CONFIGS / "metadata.json").read_text())["network_data_format"]
    assert meta["inputs"]["image"]["channel_def"] == {str(i): c for i, c in enumerate(DIXON_CHANNELS)}
    assert meta["outputs"]["pred"]["num_channels"] == 73 == len(meta["outputs"]["pred"]["channel_def"])
    assert meta["outputs"]["pred"]["channel_def"]["72"] == UKBOB_LABELS[72] == "bone_other"
    assert str(CONFIGS / "metadata.json") not in sync_metadata(check=True)


@pytest.fixture(scope="module")
def solf_root(ukbob_sample, tmp_path_factory) -> Path:
    """`python -m monai.bundle run --config_file configs/solf.json` on the sample (3 labelled volumes).

    Three volumes are no cohort: ``min_samples 2`` and ``eps 1`` make the rule act on them at all.
    """
    root = tmp_path_factory.mktemp("ukbob_bundle")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "solf.json"),
           "--bundle_root", str(root), "--min_samples", "2", "--eps", "1.0", "--workers", "1", "--plots", "False"]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env={**os.environ, "SWIN_BOB_DATA": str(ukbob_sample.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["volumes"] == 3 and summary["errors"] == 0
    return root


@pytest.mark.slow
def test_solf_json_writes_the_reports(solf_root) -> None:
    dec = pd.read_csv(solf_root / "solf" / "decisions.csv")
    assert set(dec["volume"]) == {"labels/ct_abdomen.nii.gz", "labels/ct_abdomen_crop.nii.gz", "labels/ct_dicom.nii.gz"}
    thr = pd.read_csv(solf_root / "solf" / "thresholds.csv")
    assert thr["fitted"].any() and (thr["kept"] + thr["rejected"] == thr["n"]).all()
    # the other patient's 20-slice DICOM volume differs most; the 30-slice crop's organs are cut by its
    # field of view: partial, judged only against other cut organs, not rejected for being cut
    per_volume = dec.groupby("volume")["rejected"].sum()
    assert per_volume["labels/ct_dicom.nii.gz"] >= per_volume.max() - 1 and per_volume["labels/ct_dicom.nii.gz"] >= 1
    crop = dec[dec["volume"] == "labels/ct_abdomen_crop.nii.gz"]
    assert crop["partial"].mean() > 0.5 and per_volume["labels/ct_abdomen_crop.nii.gz"] == 0


@pytest.fixture(scope="module")
def trained(solf_root):
    """One tiny epoch of train.json in ``solf_root`` (SOLF decisions applied); its workflow, run."""
    wf = workflow(["train.json"], solf_root, "train", epochs=1, val_interval=1, num_workers=0, num_samples=1,
                  cache_rate=0.0, warmup_epochs=0)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.mark.slow
def test_train_applies_decisions_and_runs_one_tiny_epoch(solf_root, trained) -> None:
    from monai.transforms import Compose

    from custom.labels import IGNORE_LABEL, UKBOB_ID

    # the deterministic + SOLF part of train#preprocessing on the cropped volume
    parser = trained.parser
    pre = Compose(parser.get_parsed_content("train#deterministic_transforms") + parser.get_parsed_content("train#solf_transforms"))
    dec = pd.read_csv(solf_root / "solf" / "decisions.csv")
    items = {d["label"]: d for d in parser.get_parsed_content("train_datalist") + parser.get_parsed_content("val_datalist")}
    per_volume = dec.groupby("volume")["rejected"].sum()
    volume = max((v for v in per_volume.index if any(label.endswith(v) for label in items)), key=per_volume.get)
    item = next(d for label, d in items.items() if label.endswith(volume))  # the volume with most rejected organs
    out = pre(dict(item))
    assert out["image"].shape[0] == 4
    img = out["image"].numpy()
    inside = img[:, (img != 0).any(0)]  # SpatialPadd adds exact zeros after the z-score
    assert np.allclose(inside.mean(1), 0, atol=0.05) and np.allclose(inside.std(1), 1, atol=0.05)  # z-score per channel
    rejected = dec[(dec["volume"] == volume) & dec["rejected"]]["organ_id"].tolist()
    lab = out["label"].numpy()
    assert (lab == IGNORE_LABEL).sum() > 0 and not np.isin(lab, rejected).any()
    assert isinstance(parser.get_parsed_content("loss").ce, torch.nn.CrossEntropyLoss)
    assert parser.get_parsed_content("loss").ce.ignore_index == IGNORE_LABEL
    assert UKBOB_ID["liver"] in np.unique(lab) or UKBOB_ID["liver"] in rejected
    state = torch.load(solf_root / "models" / "model.pt", weights_only=True)
    from monai.networks.nets import SwinUNETR

    SwinUNETR(in_channels=4, out_channels=73, feature_size=12).load_state_dict(state)
    trainer = parser.get_parsed_content("train#trainer")
    assert np.isfinite(float(trainer.state.output[0]["loss"]))


@pytest.mark.slow
def test_evaluate_reports_dice_and_hd95_per_organ(solf_root, trained) -> None:
    wf = workflow(["train.json", "evaluate.json"], solf_root, "eval")
    wf.initialize()
    wf.run()
    wf.finalize()
    summary = pd.read_csv(solf_root / "eval" / "metrics_summary.csv")
    per_case = pd.read_csv(solf_root / "eval" / "metrics_per_case.csv")
    assert set(per_case["case"]) == {"ct_dicom"}  # the validation list: one volume
    organs = summary[summary["organ"] != "mean"]
    assert len(organs) == 72 and "liver" in set(organs["organ"])  # every UKBOB organ, background left out
    dice = organs["dice"].dropna()
    assert len(dice) > 0 and dice.between(0.0, 1.0).all()


@pytest.mark.slow
def test_inference_writes_ukbob_ids_in_the_input_space(solf_root, trained, ukbob_sample) -> None:
    import nibabel as nib

    wf = workflow(["inference.json"], solf_root, "infer")  # the sample's "test" list: the aorta CT, 4 channels
    wf.initialize()
    wf.run()
    wf.finalize()
    seg = nib.load(solf_root / "eval" / "ct_aorta_seg.nii.gz")
    image = nib.load(ukbob_sample / "images" / "ct_aorta.nii.gz")
    assert image.shape[3] == 4 and seg.shape == image.shape[:3]
    assert np.allclose(seg.affine, image.affine, atol=1e-4) and seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= set(range(73))


def test_use_solf_false_trains_on_the_raw_labels(ukbob_sample, tmp_path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(ukbob_sample), "use_solf": False})
    assert parser.get_parsed_content("train#solf_transforms") == []  # no decisions.csv needed
    assert len(parser.get_parsed_content("train_datalist")) == 2
    assert type(parser.get_parsed_content("loss")).__name__ == "MaskedDiceCELoss"
