"""``python -m custom.segment``: the BTCV bundle's inference.json on one real CT (file and DICOM folder).

Weights are a freshly initialised tiny SwinUNETR (feature_size 12; no trained weights are available
here), so the tests check the plumbing and the numbers derived from the label map, not accuracy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.labels import BTCV_LABELS
from custom.segment import main, segment, stats_path

REPO = Path(__file__).resolve().parents[1]
TINY = ["feature_size=12", "roi_size=[64,64,64]", "pixdim=[6,6,6]", "sw_batch_size=1", "num_workers=0"]
TINY_DICT = {"feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [6, 6, 6], "sw_batch_size": 1, "num_workers": 0}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("segment_model") / "tiny.pt"
    torch.save({"model": SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict()}, path)
    return path


@pytest.mark.slow
def test_cli_on_nifti_with_stats(tiny_model: Path, btcv_sample: Path, tmp_path: Path) -> None:
    image = btcv_sample / "images" / "ct_abdomen_crop.nii.gz"
    out = tmp_path / "seg" / "crop_seg.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "custom.segment", "-i", str(image), "-o", str(out), "--bundle", "btcv", "--device", "cpu",
         "--stats", "--qc", "--model", str(tiny_model), "--override", *TINY],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seg, src = nib.load(out), nib.load(image)
    assert seg.shape == src.shape == (122, 101, 30)
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and labels.max() < 14
    assert sorted(p.name for p in out.parent.iterdir()) == ["crop_seg.json", "crop_seg.nii.gz", "crop_seg_qc.json", "crop_seg_qc.png"]

    # TotalSegmentator's statistics.json: every organ of the taxonomy, volume in mm^3 (0 when cut by the
    # border), mean intensity; our fields beside them
    stats = json.loads(stats_path(out).read_text())
    assert list(stats) == [n for i, n in BTCV_LABELS.items() if i]
    qc = json.loads((out.parent / "crop_seg_qc.json").read_text())
    hu = np.asarray(src.dataobj, dtype=np.float64)
    for label_id, name in ((i, n) for i, n in BTCV_LABELS.items() if i):
        entry, mask = stats[name], labels == label_id
        assert entry["voxels"] == int(mask.sum()) and entry["volume_ml"] == pytest.approx(mask.sum() * 0.027, abs=1e-3)
        if entry["partial"] or not mask.any():
            assert entry["volume"] == 0.0 and entry["intensity"] == 0.0
        else:
            assert entry["volume"] == pytest.approx(mask.sum() * 27.0) and entry["intensity"] == pytest.approx(hu[mask].mean(), abs=1e-4)
        assert entry["qc"] == (qc["organs"][name]["verdict"] if mask.any() else None)


@pytest.mark.slow
def test_dicom_folder(tiny_model: Path, btcv_sample: Path, tmp_path: Path) -> None:
    out = segment(btcv_sample / "dicom" / "ct_dicom", tmp_path / "dicom_seg.nii.gz", bundle="btcv", device="cpu",
                  model=tiny_model, overrides=TINY_DICT)
    seg = nib.load(out)
    assert seg.shape == (512, 512, 20)
    assert np.diag(np.abs(seg.affine))[:3] == pytest.approx([0.9765625, 0.9765625, 2.0], abs=1e-3)


def _bad(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_missing_input(capsys, tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "seg.nii.gz"
    line = _bad(capsys, "-i", str(tmp_path / "nope.nii.gz"), "-o", str(out), "--model", str(tiny_model))
    assert "nope.nii.gz: file not found" in line
    assert not out.exists()


def test_missing_weights(capsys, tmp_path: Path, btcv_sample: Path) -> None:
    line = _bad(capsys, "-i", str(btcv_sample / "images" / "ct_abdomen_crop.nii.gz"), "-o", str(tmp_path / "s.nii.gz"),
                "--model", str(tmp_path / "none.pt"))
    assert "model weights not found" in line and "large_files.yml" in line


def test_etta_needs_the_bundle_switch(capsys, tmp_path: Path, btcv_sample: Path, tiny_model: Path) -> None:
    """A bundle without ``use_etta`` must refuse --etta, not silently run without it."""
    fake = tmp_path / "bundles" / "swin_bob_btcv"
    shutil.copytree(REPO / "bundles" / "swin_bob_btcv" / "configs", fake / "configs")
    config = json.loads((fake / "configs" / "inference.json").read_text())
    config.pop("use_etta")
    (fake / "configs" / "inference.json").write_text(json.dumps(config))
    line = _bad(capsys, "-i", str(btcv_sample / "images" / "ct_abdomen_crop.nii.gz"), "-o", str(tmp_path / "s.nii.gz"),
                "--etta", "--model", str(tiny_model), "--bundles_root", str(tmp_path / "bundles"))
    assert "use_etta" in line


@pytest.mark.slow
def test_corrupt_and_wrong_channel_inputs(capsys, tmp_path: Path, ukbob_sample: Path, tiny_model: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really a gzip file")
    out = tmp_path / "seg.nii.gz"
    line = _bad(capsys, "-i", str(broken), "-o", str(out), "--model", str(tiny_model))
    assert "broken.nii.gz" in line
    dixon = ukbob_sample / "images" / "ct_abdomen_crop.nii.gz"  # 4 Dixon-like channels; BTCV takes 1
    line = _bad(capsys, "-i", str(dixon), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                "--override", *TINY)
    assert "4 channel(s), the model needs 1" in line
    assert list(tmp_path.iterdir()) == [broken]  # no output, no temporary folder left behind
