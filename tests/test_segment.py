"""``python -m custom.segment``: the BTCV bundle's inference.json on one real CT (file and DICOM folder).

Weights are a freshly initialised tiny SwinUNETR (feature_size 12; no trained weights are available
here), so the tests check the plumbing and the numbers derived from the label map, not accuracy.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
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


# ---------------------------------------------------------------- cohorts: folder in, folder out
def _cohort(btcv_sample: Path, folder: Path, names: list[str], bad: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:  # real CT, 122 x 101 x 30 at 3 mm
        shutil.copy(btcv_sample / "images" / "ct_abdomen_crop.nii.gz", folder / f"{name}.nii.gz")
    if bad:
        (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    return folder


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "custom.segment", *argv], capture_output=True, text=True, cwd=REPO, **kwargs)


@pytest.mark.slow
def test_cohort_with_a_bad_file_goes_on_and_reports_it(tiny_model: Path, btcv_sample: Path, tmp_path: Path) -> None:
    cohort = _cohort(btcv_sample, tmp_path / "in", ["a", "b"], bad=True)
    out = tmp_path / "out"
    proc = _run("-i", str(cohort), "-o", str(out), "--model", str(tiny_model), "--device", "cpu", "--stats", "--qc",
                "--override", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_case = [f"{c}_seg{s}" for c in "ab" for s in (".json", ".nii.gz", "_qc.json", "_qc.png")]
    assert sorted(p.name for p in out.iterdir()) == sorted([*per_case, "errors.csv", "qc_flags.csv", "statistics.csv"])
    rows = list(csv.DictReader((out / "errors.csv").open()))
    assert [(r["case"], Path(r["image"]).name) for r in rows] == [("broken", "broken.nii.gz")]
    assert "cannot be read as an image" in rows[0]["error"]
    labels = np.asarray(nib.load(out / "a_seg.nii.gz").dataobj)
    table = list(csv.DictReader((out / "statistics.csv").open()))
    assert {r["case"] for r in table} == {"a", "b"}
    ids = {name: i for i, name in BTCV_LABELS.items()}
    assert {ids[r["structure"]] for r in table if r["case"] == "a"} == {int(i) for i in np.unique(labels) if i}
    for row in (r for r in table if r["case"] == "a"):
        assert int(row["voxels"]) == int((labels == ids[row["structure"]]).sum())
    flags = list(csv.DictReader((out / "qc_flags.csv").open()))
    qc_a = json.loads((out / "a_seg_qc.json").read_text())
    assert sum(int(r[qc_a["organs"][r["organ"]]["verdict"]]) for r in flags if r["organ"] in qc_a["organs"]) >= len(qc_a["organs"])
    # quiet: the command's own lines only (one per step and case), nothing on stdout
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("[segment] ") for line in lines), lines
    assert len(lines) == 5  # plan, 3 cases, summary


@pytest.mark.slow
def test_cohort_killed_after_its_first_case_resumes(tiny_model: Path, btcv_sample: Path, tmp_path: Path) -> None:
    cohort = _cohort(btcv_sample, tmp_path / "in", ["a", "b", "c"])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "custom.segment", "-i", str(cohort), "-o", str(out), "--model", str(tiny_model),
            "--device", "cpu", "--override", *TINY]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("*_seg.nii.gz")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first = sorted(out.glob("*_seg.nii.gz"))
    assert len(first) == 1, "the run was not killed after its first case"
    stamp = first[0].stat().st_mtime_ns

    rerun = _run(*argv[3:])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 already done, 2 to segment" in rerun.stderr
    assert first[0].stat().st_mtime_ns == stamp  # not redone
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz", "c_seg.nii.gz"]


@pytest.mark.slow
def test_dask_cluster_gives_the_local_outputs(tiny_model: Path, btcv_sample: Path, tmp_path: Path) -> None:
    from distributed import LocalCluster

    from custom.segment import segment_cohort

    cohort = _cohort(btcv_sample, tmp_path / "in", ["a", "b"])
    local = segment_cohort(cohort, tmp_path / "local", model=tiny_model, device="cpu", overrides=TINY_DICT)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = segment_cohort(cohort, tmp_path / "dask", model=tiny_model, device="cpu", overrides=TINY_DICT,
                              scheduler=cluster.scheduler_address)
    assert local["done"] == dask["done"] == 2 and not dask["errors"]
    for name in ("a_seg.nii.gz", "b_seg.nii.gz"):
        a, b = nib.load(tmp_path / "local" / name), nib.load(tmp_path / "dask" / name)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)


def test_bad_single_input_prints_only_the_error_line(tiny_model: Path, ukbob_sample: Path, tmp_path: Path) -> None:
    dixon = ukbob_sample / "images" / "ct_abdomen_crop.nii.gz"  # 4 channels; BTCV takes 1
    proc = _run("-i", str(dixon), "-o", str(tmp_path / "s.nii.gz"), "--model", str(tiny_model), "--device", "cpu",
                "--override", *TINY)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "4 channel(s), the model needs 1" in lines[-1]
    assert all(line.startswith("[segment] ") for line in lines[:-1]), lines
