"""The swin_bob_btcv bundle end to end through ``monai.bundle`` on the real sample CT.

One tiny training run (SwinUNETR feature_size 12, 64^3 patches, 6 mm voxels, 1 epoch, MLflow
tracking on) feeds the evaluation and inference tests. Sizes are test sizes, not the bundle defaults.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.export_bundle import DEFAULT_SCHEMA as SCHEMA

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_bob_btcv"
CONFIGS = BUNDLE / "configs"
LOGGING = str(CONFIGS / "logging.conf")
TINY = {
    "feature_size": 12,
    "roi_size": [64, 64, 64],
    "pixdim": [6.0, 6.0, 6.0],
    "sw_batch_size": 1,
    "num_workers": 0,
}
TRAIN_TINY = {**TINY, "epochs": 1, "val_interval": 1, "num_samples": 1, "cache_rate": 0.0, "validate#inferer#overlap": 0.0}
INFER_TINY = {**TINY, "sliding_window_inferer#overlap": 0.0}


def _config(*names: str) -> list[str]:
    return [str(CONFIGS / n) for n in names]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, btcv_sample) -> Path:
    """bundle_root of a 1-epoch tiny training run with ``--tracking mlflow``."""
    from monai.bundle import run

    root = tmp_path_factory.mktemp("btcv_bundle")
    run(
        config_file=_config("train.json"), logging_file=LOGGING, bundle_root=str(root), dataset_dir=str(btcv_sample),
        tracking="mlflow", **TRAIN_TINY,
    )
    return root


def test_metadata_names_the_schema_and_classes():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["schema"].startswith("https://github.com/Project-MONAI/MONAI-extra-test-data/")
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 14


def test_pretrained_ckpt_loaded_before_training(trained, btcv_sample):
    """``pretrained_ckpt`` goes through custom.transfer: encoder weights copied, head re-initialised."""
    from monai.bundle import ConfigWorkflow

    ckpt = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    wf = ConfigWorkflow(
        config_file=_config("train.json"), workflow_type="train", logging_file=LOGGING, dataset_dir=str(btcv_sample),
        pretrained_ckpt=str(trained / "models" / "model.pt"), cache_rate=0.0, **TINY,
    )
    wf.initialize()
    state = wf.parser.get_parsed_content("network").state_dict()
    key = "swinViT.patch_embed.proj.weight"
    assert torch.equal(state[key], ckpt[key])
    assert not torch.equal(state["out.conv.conv.weight"], ckpt["out.conv.conv.weight"])


def test_train_writes_model_and_mlflow_run(trained):
    # save_dict {"model": @network}: ignite stores a single object as its bare state_dict (the zoo's layout)
    ckpt = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    from monai.networks.nets import SwinUNETR

    SwinUNETR(in_channels=1, out_channels=14, feature_size=12).load_state_dict(ckpt)  # strict: same layout
    import mlflow

    # MONAI 1.6's --tracking mlflow default store: sqlite <output_dir>/mlruns.db, artifacts in mlruns/
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{trained / 'eval' / 'mlruns.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1
    assert {"train_loss", "val_mean_dice"} <= set(runs[0].data.metrics)
    assert 0.0 <= runs[0].data.metrics["val_mean_dice"] <= 1.0


def test_evaluate_writes_dice_and_hd95_per_organ(trained, btcv_sample):
    from monai.bundle import run

    out = trained / "eval_metrics"
    run(
        config_file=_config("train.json", "evaluate.json"), logging_file=LOGGING, bundle_root=str(trained),
        dataset_dir=str(btcv_sample), output_dir=str(out), **{k: v for k, v in TRAIN_TINY.items() if k != "cache_rate"},
    )
    with open(out / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and {r["case"] for r in rows} == {"ct_dicom"}
    assert [r["organ"] for r in rows[:3]] == ["spleen", "kidney_right", "kidney_left"]
    ref = np.asarray(nib.load(btcv_sample / "labels" / "ct_dicom.nii.gz").dataobj)
    for r in rows:
        dice, present = float(r["dice"]), bool((ref == int(r["organ_id"])).any())
        if present:  # a reference organ always has a Dice in [0, 1]
            assert math.isfinite(dice) and 0.0 <= dice <= 1.0, r
        else:  # MONAI gives NaN when the reference lacks the organ
            assert math.isnan(dice), r
        if math.isfinite(float(r["hd95_mm"])):
            assert float(r["hd95_mm"]) >= 0.0
    with open(out / "metrics_summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert summary[-1]["organ"] == "mean" and 0.0 <= float(summary[-1]["dice"]) <= 1.0
    assert (out / "overlays" / "ct_dicom_overlay.png").stat().st_size > 10_000  # custom.visualize.OverlaySaver


def _check_label_map(path: Path, ref_shape, ref_affine) -> np.ndarray:
    seg = nib.load(path)
    assert seg.shape == tuple(ref_shape)
    np.testing.assert_allclose(seg.affine, np.asarray(ref_affine), atol=1e-3)
    data = np.asarray(seg.dataobj)
    assert data.dtype == np.uint8 and data.max() < 14
    return data


def test_inference_nifti_in_input_space(trained, btcv_sample):
    from monai.bundle import run

    image = btcv_sample / "images" / "ct_abdomen_crop.nii.gz"
    out = trained / "pred_nifti"
    run(config_file=_config("inference.json"), logging_file=LOGGING, bundle_root=str(trained), input_path=str(image),
        output_dir=str(out), **INFER_TINY)
    src = nib.load(image)
    _check_label_map(out / "ct_abdomen_crop_seg.nii.gz", src.shape, src.affine)


def test_inference_dicom_series_folder(trained, btcv_sample):
    from monai.bundle import run
    from monai.transforms import LoadImage

    folder = btcv_sample / "dicom" / "ct_dicom"
    out = trained / "pred_dicom"
    run(config_file=_config("inference.json"), logging_file=LOGGING, bundle_root=str(trained), input_path=str(folder),
        output_dir=str(out), **INFER_TINY)
    src = LoadImage(image_only=True)(str(folder))  # the series as MONAI reads it (RAS world coordinates)
    assert tuple(src.shape) == (512, 512, 20)
    _check_label_map(out / "ct_dicom_seg.nii.gz", src.shape, src.affine)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, btcv_sample) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_inputs")
    ct = nib.load(btcv_sample / "images" / "ct_abdomen_crop.nii.gz")
    hu = np.asarray(ct.dataobj, dtype=np.float32)[::4, ::4, ::2]
    affine = ct.affine @ np.diag([4.0, 4.0, 2.0, 1.0])
    two = np.stack([hu, hu], axis=-1)
    nib.save(nib.Nifti1Image(two, affine), d / "two_channel.nii.gz")
    nan = hu.copy()
    nan[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), d / "nan.nii.gz")
    (d / "not_image.nii.gz").write_text("this is a CSV, not an image\n")
    return {"missing": d / "missing.nii.gz", "not_image": d / "not_image.nii.gz",
            "two_channel": d / "two_channel.nii.gz", "nan": d / "nan.nii.gz"}


@pytest.mark.slow
@pytest.mark.parametrize(("case", "problem"), [
    ("missing", "file not found"), ("not_image", "not a readable NIfTI"),
    ("two_channel", "2 channel(s), the model needs 1"), ("nan", "NaN or infinite"),
])
def test_bad_input_one_line_no_output(case, problem, bad_inputs, trained, tmp_path):
    """The real CLI: exit code 2, one ``error:`` line naming the file and the problem, no output file."""
    out = tmp_path / "out"
    overrides = [f"--{k}={json.dumps(v)}" for k, v in INFER_TINY.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
         "--logging_file", LOGGING, "--bundle_root", str(trained), "--input_path", str(bad_inputs[case]),
         "--output_dir", str(out), *overrides],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert str(bad_inputs[case]) in errors[0] and problem in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists() or not any(out.iterdir())
