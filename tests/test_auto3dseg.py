"""Auto3DSeg template ``swinbob``: AutoRunner end to end on the real BTCV sample, on the CPU.

One AutoRunner run (data analysis -> algorithm generation -> training -> ensemble inference) is
shared by the tests below; it is kept small with the template's own override section
(feature_size 12, ROI 64^3, 6 mm voxels, one epoch).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from custom.auto3dseg import TEMPLATES_PATH

ALGO = TEMPLATES_PATH / "swinbob"
TINY = {"feature_size": 12, "roi_size": [64, 64, 64], "resample_to_spacing": [6.0, 6.0, 6.0], "num_workers": 0,
        "num_patches_per_image": 1, "num_sw_batch_size": 1}


def _input(tmp: Path, root: Path, **extra) -> dict:
    ds = json.loads((root / "dataset.json").read_text())
    datalist = {
        # fold 0 validates on ct_abdomen_crop (30 slices) and trains on ct_abdomen (122 x 101 x 112, 3 mm)
        "training": [dict(ds["training"][0], fold=1), dict(ds["training"][1], fold=0)],
        "testing": [{"image": "images/ct_abdomen_crop.nii.gz"}, {"image": "images/ct_dicom.nii.gz"}],
    }
    (tmp / "datalist.json").write_text(json.dumps(datalist))
    return {"modality": "CT", "datalist": str(tmp / "datalist.json"), "dataroot": str(root), "num_fold": 1, **extra}


@pytest.fixture(scope="module")
def autorunner_run(btcv_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from monai.apps.auto3dseg import AutoRunner

    tmp = tmp_path_factory.mktemp("auto3dseg")
    runner = AutoRunner(
        work_dir=str(tmp / "work"),
        input=_input(tmp, btcv_sample, swinbob=TINY),
        algos="swinbob",
        templates_path_or_url=str(TEMPLATES_PATH),
    )
    runner.set_analyze_params({"device": "cpu", "worker": 0, "do_ccp": False})
    runner.set_training_params({"num_epochs": 1})
    runner.set_device_info(cuda_visible_devices="")  # CPU only, even on a GPU machine
    runner.run()
    return tmp / "work"


def test_template_layout() -> None:
    for name in ("scripts/algo.py", "scripts/train.py", "scripts/validate.py", "scripts/infer.py",
                 "configs/hyper_parameters.yaml", "configs/network.yaml", "configs/transforms_train.yaml"):
        assert (ALGO / name).is_file(), name
    assert "class SwinbobAlgo(BundleAlgo)" in (ALGO / "scripts/algo.py").read_text()
    # the property that MONAI's own swinunetr template lacks: no hard-coded CUDA in the scripts
    for script in (ALGO / "scripts").glob("*.py"):
        text = script.read_text()
        assert "torch.device(\"cuda" not in text and "mem_get_info" not in text, script.name


def test_roi_and_epoch_rules() -> None:
    import sys

    sys.path.insert(0, str(ALGO / "scripts"))
    from algo import epochs_for, roi_from_shape

    assert roi_from_shape([122, 101, 30]) == [96, 96, 64]
    assert roi_from_shape([70, 200, 64]) == [64, 96, 64]
    assert epochs_for(3, 2) == 1000 and epochs_for(1000, 2) == 20


@pytest.mark.slow
def test_generated_from_data_statistics(autorunner_run: Path) -> None:
    stats = yaml.safe_load((autorunner_run / "datastats.yaml").read_text())["stats_summary"]
    hp = yaml.safe_load((autorunner_run / "swinbob_0/configs/hyper_parameters.yaml").read_text())
    assert hp["input_channels"] == 1
    assert hp["output_classes"] == 14  # BTCV ids 0..13; esophagus (5) is absent from the CT but keeps its channel
    assert 5 not in stats["label_stats"]["labels"]
    assert hp["modality"] == "ct"
    fg = stats["image_foreground_stats"]["intensity"]
    assert hp["intensity_bounds"] == pytest.approx([fg["percentile_00_5"], fg["percentile_99_5"]])
    assert -1000 < hp["intensity_bounds"][0] < 0 < hp["intensity_bounds"][1] < 1500  # HU of soft tissue
    for key, value in TINY.items():
        assert hp[key] == value
    assert hp["fold"] == 0 and hp["bundle_root"] == str(autorunner_run / "swinbob_0")


@pytest.mark.slow
def test_modality_picks_normalisation(autorunner_run: Path) -> None:
    from monai.bundle import ConfigParser

    configs = sorted(str(p) for p in (autorunner_run / "swinbob_0/configs").glob("*.yaml"))
    parser = ConfigParser()
    parser.read_config(configs)
    assert type(parser.get_parsed_content("intensity_transform")).__name__ == "ScaleIntensityRanged"
    parser["modality"] = "mr"
    parser.parse(True)
    assert type(parser.get_parsed_content("intensity_transform")).__name__ == "NormalizeIntensityd"


@pytest.mark.slow
def test_trained_and_scored(autorunner_run: Path) -> None:
    model = autorunner_run / "swinbob_0/model"
    assert (model / "best_metric_model.pt").stat().st_size > 1_000_000
    progress = yaml.safe_load((model / "progress.yaml").read_text())
    assert 0.0 <= progress[-1]["best_avg_dice_score"] <= 1.0 and progress[-1]["best_epoch"] == 1
    assert list((model / "tb").glob("events.out.tfevents.*"))
    algo = json.loads((autorunner_run / "swinbob_0/algo_object.json").read_text())
    assert algo["_target_"] == "swinbob.scripts.algo.SwinbobAlgo"
    assert algo["best_metric"] == pytest.approx(progress[-1]["best_avg_dice_score"])


@pytest.mark.slow
def test_predictions_on_input_grid(autorunner_run: Path, btcv_sample: Path) -> None:
    out = autorunner_run / "ensemble_output"
    for name, shape in (("ct_abdomen_crop", (122, 101, 30)), ("ct_dicom", (512, 512, 20))):
        files = list(out.rglob(f"{name}_ensemble.nii.gz"))
        assert len(files) == 1, sorted(out.rglob("*"))
        pred = nib.load(files[0])
        src = nib.load(btcv_sample / "images" / f"{name}.nii.gz")
        assert pred.shape == shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-3)
        labels = np.unique(np.asarray(pred.dataobj))
        assert labels.min() >= 0 and labels.max() <= 13


def test_bad_override_key_is_rejected(btcv_sample: Path, tmp_path: Path) -> None:
    from monai.apps.auto3dseg import BundleGen

    stats = tmp_path / "datastats.yaml"
    stats.write_text(yaml.safe_dump({"stats_summary": {
        "image_stats": {"spacing": {"median": [1.0, 1.0, 1.0]}, "sizemm": {"median": [100.0, 100.0, 100.0]},
                        "channels": {"max": 4}},
        "label_stats": {"labels": [0, 1, 2]}, "n_cases": 4,
        "image_foreground_stats": {"intensity": {"percentile_00_5": 0.0, "percentile_99_5": 1.0}}}}))
    src = tmp_path / "input.yaml"
    src.write_text(yaml.safe_dump(_input(tmp_path, btcv_sample, modality="MRI", swinbob={"featuresize": 12})))
    gen = BundleGen(algo_path=str(tmp_path), algos="swinbob", templates_path_or_url=str(TEMPLATES_PATH),
                    data_stats_filename=str(stats), data_src_cfg_name=str(src))
    with pytest.raises(ValueError, match="featuresize"):
        gen.generate(str(tmp_path), num_fold=1)
    src.write_text(yaml.safe_dump(_input(tmp_path, btcv_sample, modality="MRI")))
    gen.generate(str(tmp_path), num_fold=1)
    hp = yaml.safe_load((tmp_path / "swinbob_0/configs/hyper_parameters.yaml").read_text())
    assert (hp["input_channels"], hp["output_classes"], hp["modality"]) == (4, 3, "mri")
    assert hp["roi_size"] == [96, 96, 96] and hp["num_epochs"] == 1000
