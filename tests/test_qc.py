"""Cohort references and per-scan QC on real anatomy.

The cohort: 20 subjects made from the real TotalSegmentator labels of the sample CT in BTCV ids
(``btcv_sample``) by random affine + elastic variation (``custom.solf.simulate``); its reference is built
through the SOLF runner (``python -m custom.solf reference``). New scans: other seeds of the same
generator, clean or with one organ grossly corrupted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from custom.errors import InputError, find_input_error
from custom.labels import BTCV_LABELS, TOTALSEG_TOTAL_TO_UKBOB, UKBOB_LABELS
from custom.solf import reference as R
from custom.solf.features import FEATURES
from custom.solf.qc import flag_table, qc_folder, scan_qc, write_case
from custom.solf.simulate import inject, make_subject, write_cohort

REPO = Path(__file__).resolve().parents[1]
N = 20
KIDNEY, GALLBLADDER = 2, 4  # BTCV ids of organs the sample CT holds whole


@pytest.fixture(scope="module")
def base(btcv_sample) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(btcv_sample / "labels" / "ct_abdomen.nii.gz"))
    return np.asarray(img.dataobj).astype(np.uint8), img.affine


@pytest.fixture(scope="module")
def ref_file(btcv_sample, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qc_cohort")
    datalist, _ = write_cohort(btcv_sample / "labels" / "ct_abdomen.nii.gz", folder, N, error_rate=0.0, seed=3)
    out = folder / "ref.json"
    proc = subprocess.run([sys.executable, "-m", "custom.solf", "reference", "--datalist", str(datalist), "-o", str(out),
                           "--taxonomy", "btcv", "--workers", "1", "--note", "test cohort"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["volumes"] == N
    return out


def test_reference_file_is_small_versioned_and_round_trips(ref_file) -> None:
    data = json.loads(ref_file.read_text())
    assert data["format"] == R.FORMAT and data["version"] == R.VERSION and data["taxonomy"] == "btcv"
    assert data["provenance"]["volumes"] == N and data["provenance"]["note"] == "test cohort"
    assert ref_file.stat().st_size < 20_000
    ref = R.load(ref_file, "btcv")
    kidney = ref.organs[KIDNEY]  # UKBOB id 2 = kidney_right
    assert kidney["organ"] == "kidney_right" and kidney["fitted"] and kidney["n"] + kidney["n_partial"] == N
    assert 0.03 < kidney["norm_volume_median"] < 0.3 and 0 < kidney["norm_volume_sd"] < 0.05
    assert 0.4 < kidney["sphericity_median"] < 1 and 0.5 < kidney["eccentricity_median"] < 1
    thr = ref.thresholds(2.0).set_index("organ_id")
    assert thr.loc[KIDNEY, "sphericity_hi"] == pytest.approx(kidney["sphericity_median"] + 2 * kidney["sphericity_sd"])
    R.save(ref, ref_file.with_name("again.json"))
    assert json.loads(ref_file.with_name("again.json").read_text())["organs"] == data["organs"]


def test_loading_another_taxonomy_or_version_is_refused(ref_file, tmp_path) -> None:
    with pytest.raises(InputError, match="built from btcv labels, these labels are ukbob.*Fix: use a reference built from ukbob"):
        R.load(ref_file, "ukbob")
    data = json.loads(ref_file.read_text())
    (tmp_path / "v0.json").write_text(json.dumps({**data, "version": 0}))
    with pytest.raises(InputError, match="version 0, this code reads version 1.*Fix: rebuild"):
        R.load(tmp_path / "v0.json")
    (tmp_path / "other.json").write_text(json.dumps({"organs": {}}))
    with pytest.raises(InputError, match="not a SOLF cohort reference"):
        R.load(tmp_path / "other.json")
    proc = subprocess.run([sys.executable, "-m", "custom.solf", "qc", "--labels", str(ref_file.parent / "labels"), "--taxonomy", "ukbob",
                           "--output_dir", str(tmp_path / "out"), "--reference", str(ref_file)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "built from btcv labels" in proc.stderr


def _bar(labels: np.ndarray, organ: int) -> np.ndarray:
    """The organ replaced by a straight bar of about the same voxel count through its centroid."""
    out = labels.copy()
    idx = np.argwhere(labels == organ)
    out[labels == organ] = 0
    c = idx.mean(axis=0).round().astype(int)
    length = min(len(idx) // 9, labels.shape[1] - 8)
    y0 = min(max(4, c[1] - length // 2), labels.shape[1] - 4 - length)  # whole: clear of the border
    out[c[0] - 1 : c[0] + 2, y0 : y0 + length, c[2] - 1 : c[2] + 2] = organ
    return out


def test_gross_errors_are_flagged_and_clean_scans_pass(ref_file, base) -> None:
    ref = R.load(ref_file, "btcv")
    labels, affine = base
    clean_verdicts = []
    for seed in range(N):  # the cohort's own clean scans (write_cohort's seeds)
        scan, _ = make_subject(labels, 3 * 100_003 + seed)
        clean_verdicts += [o["verdict"] for o in scan_qc(scan, affine, ref)["organs"].values()]
    judged = sum(v in ("ok", "outlier") for v in clean_verdicts)
    assert judged > 5 * N and clean_verdicts.count("outlier") <= 0.08 * judged  # eps 2, 2 of 3: a few per cent
    new, _ = make_subject(labels, 12345)
    qc = scan_qc(new, affine, ref)
    assert qc["organs"]["kidney_right"]["verdict"] == "ok" and qc["organs"]["gallbladder"]["verdict"] == "ok"
    rng = np.random.default_rng(0)
    cases = {
        "over": (inject(new, "over", GALLBLADDER, rng)[0], "gallbladder"),
        "truncated": (inject(new, "truncated", KIDNEY, rng)[0], "kidney_right"),
        "bar": (_bar(new, KIDNEY), "kidney_right"),
    }
    for kind, (scan, organ) in cases.items():
        o = scan_qc(scan, affine, ref)["organs"][organ]
        assert o["verdict"] == "outlier" and o["outliers"] >= 2 and not o["partial"], (kind, o)
    bar = scan_qc(cases["bar"][0], affine, ref)["organs"]["kidney_right"]
    assert bar["out_sphericity"] and bar["out_eccentricity"] and bar["z_sphericity"] < -2  # a bar is a shape error


def test_organ_cut_by_the_border_is_partial_not_an_outlier(ref_file, base, tmp_path) -> None:
    ref = R.load(ref_file, "btcv")
    labels, affine = base
    scan, _ = make_subject(labels, 12345)
    zs = np.flatnonzero((scan == KIDNEY).any(axis=(0, 1)))
    cut = scan[:, :, : (zs[0] + zs[-1]) // 2]  # the scan ends half-way through the right kidney
    qc = scan_qc(cut, affine, ref)
    kid = qc["organs"]["kidney_right"]
    assert kid["partial"] and kid["verdict"] == "partial" and not kid["partial_too_large"]
    assert kid["outliers"] == 0 and max(abs(kid[f"z_{f}"]) for f in FEATURES) > 2  # far off, had it been judged
    assert "kidney_right" in qc["summary"]["partial"] and "kidney_right" not in qc["summary"]["outlier"]
    # an over-segmented organ cut by the border is still caught: cutting cannot make it larger than whole
    big, _ = inject(scan, "over", KIDNEY, np.random.default_rng(1))
    big_cut = big[:, :, : (zs[0] + zs[-1]) // 2 + 8]
    o = scan_qc(big_cut, affine, ref)["organs"]["kidney_right"]
    assert o["partial"] and o["partial_too_large"] and o["verdict"] == "outlier"
    # files: qc.json and the PNG of the flagged organs
    qc2 = write_case(tmp_path / "case_seg.nii.gz", _bar(scan, KIDNEY), affine, ref, image=None)
    assert json.loads((tmp_path / "case_seg_qc.json").read_text())["organs"]["kidney_right"]["verdict"] == "outlier"
    assert (tmp_path / "case_seg_qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = flag_table({"a": qc, "b": qc2}).set_index("organ")
    assert table.loc["kidney_right", "partial"] == 1 and table.loc["kidney_right", "outlier"] == 1


def test_qc_transform_from_a_bundle_config(ref_file, base, tmp_path) -> None:
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    labels, affine = base
    scan = _bar(make_subject(labels, 12345)[0], KIDNEY)
    parser = ConfigParser({"output_dir": str(tmp_path), "qc": {
        "_target_": "custom.solf.transforms.SOLFQCd", "keys": "pred", "image_key": "image",
        "reference": str(ref_file), "taxonomy": "btcv", "output_dir": "@output_dir"}})
    qc = parser.get_parsed_content("qc")
    pred = MetaTensor(torch.from_numpy(scan[None].astype(np.float32)), affine=torch.as_tensor(affine),
                      meta={"filename_or_obj": "/data/case7.nii.gz"})
    image = torch.rand(1, *scan.shape)
    out = qc({"pred": pred, "image": image})
    assert out["pred"] is pred and out["qc"]["organs"]["kidney_right"]["verdict"] == "outlier"
    assert (tmp_path / "case7_qc.json").exists() and (tmp_path / "case7_qc.png").exists()
    with pytest.raises(Exception) as err:  # MONAI wraps it; the CLI's exit_on_input_error finds it in the chain
        ConfigParser({"qc": {"_target_": "custom.solf.transforms.SOLFQCd", "keys": "pred", "reference": str(ref_file),
                             "taxonomy": "ukbob"}}).get_parsed_content("qc")
    assert "built from btcv" in str(find_input_error(err.value))


def test_solf_qc_on_raw_totalsegmentator_labels_equals_ukbob_ids(ukbob_sample, tmp_path) -> None:
    """`solf qc --taxonomy totalsegmentator` on TotalSegmentator's own files = the UKBOB-mapped sample labels."""
    from custom.sample_data import TOTALSEGMENTATOR, data_root, fetch_sdist

    raw = fetch_sdist(TOTALSEGMENTATOR, data_root()) / "tests" / "reference_files"
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts" / "ct_abdomen.nii.gz").symlink_to(raw / "example_seg_fast_force_split.nii.gz")
    (tmp_path / "ts" / "ct_abdomen_crop.nii.gz").symlink_to(raw / "example_seg.nii.gz")
    ts = qc_folder(tmp_path / "ts", "totalsegmentator", tmp_path / "out_ts", workers=1, plots=False)
    uk = qc_folder(ukbob_sample / "labels", "ukbob", tmp_path / "out_uk", workers=1, plots=False)
    assert ts["errors"] == 0 and ts["volumes"] == 2 and uk["volumes"] == 3
    a = pd.read_parquet(tmp_path / "out_ts" / "features.parquet")
    b = pd.read_parquet(tmp_path / "out_uk" / "features.parquet")
    a["case"] = a["volume"].map(lambda v: Path(v).name)
    b["case"] = b["volume"].map(lambda v: Path(v).name)
    b = b[b["case"].isin(a["case"])]
    cols = ["case", "organ_id", "organ", "voxels", "volume_ml", "norm_volume", "sphericity", "eccentricity", "partial"]
    pd.testing.assert_frame_equal(a[cols].sort_values(["case", "organ_id"]).reset_index(drop=True),
                                  b[cols].sort_values(["case", "organ_id"]).reset_index(drop=True))
    assert set(a["organ_id"]) <= set(TOTALSEG_TOTAL_TO_UKBOB.values()) and len(a) > 40
    assert (tmp_path / "out_ts" / "decisions.csv").exists() and (tmp_path / "out_ts" / "summary.json").exists()
    assert set(BTCV_LABELS.values()) - {"background"} <= set(UKBOB_LABELS.values())  # BTCV names are UKBOB names
