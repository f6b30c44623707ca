"""The SOLF runner on a real-anatomy cohort: outputs, a corrupt file, a killed worker, a Dask cluster.

The cohort is 12 subjects made from the real TotalSegmentator label map of the sample CT (UKBOB ids)
by random affine + elastic variation; two of them get a grossly over-segmented organ, and a corrupt
"NIfTI" sits in the middle of the datalist.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from custom.atomic import _temp_name
from custom.labels import IGNORE_LABEL
from custom.solf import batch
from custom.solf.simulate import inject, make_subject

N = 12
OVER = {3: 5, 8: 1}  # subject -> organ grossly over-segmented (liver, spleen)


@pytest.fixture(scope="module")
def cohort(ukbob_sample, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("cohort")
    base_img = nib.load(str(ukbob_sample / "labels" / "ct_abdomen.nii.gz"))
    base = np.asarray(base_img.dataobj).astype(np.uint8)
    (folder / "labels").mkdir()
    entries, truth = [], {}
    for i in range(N):
        labels, _ = make_subject(base, seed=i)
        if i in OVER:
            labels, _ = inject(labels, "over", OVER[i], np.random.default_rng(i))
            truth[f"labels/sub_{i:02d}.nii.gz"] = OVER[i]
        nib.save(nib.Nifti1Image(labels, base_img.affine), str(folder / f"labels/sub_{i:02d}.nii.gz"))
        entries.append({"label": f"labels/sub_{i:02d}.nii.gz"})
        if i == N // 2:  # a truncated download in the middle of the list
            (folder / "labels" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
            entries.append({"label": "labels/broken.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"training": entries}))
    return folder / "dataset.json", truth


@pytest.fixture(scope="module")
def local_run(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("solf_local")
    batch.run(cohort[0], out, workers=2)
    return out


@pytest.mark.slow
def test_run_on_a_real_anatomy_cohort(cohort, local_run) -> None:
    datalist, truth = cohort
    out = local_run
    errors = pd.read_csv(out / "errors.csv")
    assert errors["volume"].tolist() == ["labels/broken.nii.gz"] and "cannot be read" in errors["error"][0]
    feats = pd.read_parquet(out / "features.parquet")
    assert feats["volume"].nunique() == N and len(feats) > 30 * N  # ~40 organs per subject
    dec = pd.read_csv(out / "decisions.csv")
    assert {"volume", "organ_id", "organ", "norm_volume", "sphericity", "eccentricity", "outliers", "rejected", "action"} <= set(dec)
    assert len(dec) == len(feats)
    rejected = set(zip(dec.loc[dec["rejected"], "volume"], dec.loc[dec["rejected"], "organ_id"]))
    assert set(truth.items()) <= rejected  # both over-segmented organs are rejected
    clean_rejected = len(rejected - set(truth.items())) / (len(dec) - len(truth))
    assert clean_rejected < 0.08
    thr = pd.read_csv(out / "thresholds.csv").groupby("organ")[["n", "rejected"]].sum()  # whole + partial rows
    assert thr.loc["liver", "n"] == N and thr.loc["liver", "rejected"] >= 1
    assert dec["partial"].any() and (~dec["partial"]).any()  # the sample CT's field of view cuts some organs
    # the filtered label of subject 3: its liver became the ignore value, everything else kept
    filt = np.asarray(nib.load(str(out / "labels" / "labels" / "sub_03.nii.gz")).dataobj)
    raw = np.asarray(nib.load(str(datalist.parent / "labels" / "sub_03.nii.gz")).dataobj)
    assert (filt == 5).sum() == 0 and (filt == IGNORE_LABEL).sum() >= (raw == 5).sum() * 0.99
    filtered_list = json.loads((out / "datalist.json").read_text())["training"]
    assert len(filtered_list) == N and all((out / e["label"]).exists() for e in filtered_list)
    assert len(list((out / "plots").glob("*.png"))) == feats["organ_id"].nunique()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 1 and summary["volumes"] == N


@pytest.mark.slow
def test_killed_worker_then_resume_without_redoing_finished_volumes(cohort, tmp_path) -> None:
    datalist, _ = cohort
    cmd = [sys.executable, "-m", "custom.solf", "features", "--datalist", str(datalist), "--output_dir", str(tmp_path), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = tmp_path / "stage_a"

    def published() -> list[Path]:  # pathlib's "*" also matches the hidden temporary files
        return [p for p in results.glob("*.json") if not p.name.startswith(".")]

    deadline = time.time() + 240
    while time.time() < deadline and len(published()) < 3:
        time.sleep(0.02)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert children, "the runner has no worker process"
    for pid in children:  # a real kill of the worker process, mid-run
        os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "worker process died" in err
    done = {p.name: p.stat().st_mtime_ns for p in published()}
    assert 3 <= len(done) < N
    assert not list(results.glob(".*tmp*"))  # no half-written result

    stale = _temp_name(results / "crashed.json")  # what a runner killed as a whole (parent too) would leave
    stats = batch.features(datalist, tmp_path, workers=1)
    assert not stale.exists() and not list(results.glob(".*tmp*"))
    assert stats["skipped"] == len(done) and stats["computed"] == N - len(done) and stats["errors"] == 1
    assert all(results.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in done.items())
    again = batch.features(datalist, tmp_path, workers=1)
    assert again["skipped"] == N and again["computed"] == 0


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_tables(cohort, local_run, tmp_path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        batch.features(cohort[0], tmp_path, scheduler=cluster.scheduler_address)
    batch.fit(tmp_path)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "features.parquet"), pd.read_parquet(local_run / "features.parquet"))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "decisions.csv"), pd.read_csv(local_run / "decisions.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "thresholds.csv"), pd.read_csv(local_run / "thresholds.csv"))
    assert pd.read_csv(tmp_path / "errors.csv")["volume"].tolist() == ["labels/broken.nii.gz"]


@pytest.mark.parametrize("step, missing, made_by", [("fit", "features.parquet", "features"), ("apply", "decisions.csv", "fit"),
                                                     ("report", "decisions.csv", "fit")])
def test_a_step_without_its_inputs_names_the_step_to_run(step, missing, made_by, tmp_path, capsys) -> None:
    from custom.solf import __main__ as cli

    args = {"output_dir": str(tmp_path)} | ({"datalist": str(tmp_path / "dataset.json")} if step == "apply" else {})
    with pytest.raises(SystemExit) as exit_info:
        getattr(cli, step)(**args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code != 0 and len(err) == 1
    assert err[0].startswith(f"error: {tmp_path / missing}: not found") and f"custom.solf {made_by}`" in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing written
