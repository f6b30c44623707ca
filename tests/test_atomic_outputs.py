"""Every output is written to a temporary file and renamed into place: after a crash an output path is
either absent or complete.

The crash is real: the command runs in a child process whose ``os.replace`` kills the process
(SIGKILL) at the moment it would rename one chosen output into place - the worst moment, when the
temporary file is complete and nothing else has been cleaned up. Writers that wrote straight to the
target would leave it there; these tests would then fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: run ``python -m MODULE ARGS`` with ``os.replace`` onto a file named TARGET killing the process first
KILL_AT_RENAME = """
import os, runpy, signal, sys
target, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
real_replace = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(os.fspath(dst)) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _run(args: list[str], kill_at: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", KILL_AT_RENAME, kill_at, *args] if kill_at else [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _visible(folder: Path) -> list[Path]:
    """Output files a user would see (temporary files start with a dot)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def solf_datalist(ukbob_sample, tmp_path_factory) -> Path:
    """Two real UKBOB-labelled volumes (the 30-slice crop and the DICOM case), paths absolute."""
    entries = [{"image": str(ukbob_sample / "images" / f"{c}.nii.gz"), "label": str(ukbob_sample / "labels" / f"{c}.nii.gz")}
               for c in ("ct_abdomen_crop", "ct_dicom")]
    path = tmp_path_factory.mktemp("solf_in") / "dataset.json"
    path.write_text(json.dumps({"training": entries}))
    return path


@pytest.mark.slow
def test_solf_killed_while_publishing_decisions_leaves_only_complete_files(solf_datalist, tmp_path):
    out = tmp_path / "solf"
    args = ["custom.solf", "run", "--datalist", str(solf_datalist), "--output_dir", str(out), "--workers", "1", "--plots", "false"]
    killed = _run(args, kill_at="decisions.csv")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = {p.relative_to(out).as_posix() for p in _visible(out)}
    # stage A finished and was published; stage B was killed at its rename: nothing after it exists
    assert {"features.parquet", "errors.csv", "thresholds.csv"} <= names
    assert not names & {"decisions.csv", "summary.json", "datalist.json"}
    assert not any(n.startswith("labels/") for n in names)
    features = pd.read_parquet(out / "features.parquet")  # complete: readable, both volumes
    assert features["volume"].nunique() == 2 and len(features) > 20
    thresholds = pd.read_csv(out / "thresholds.csv")  # written just before the kill: complete
    assert set(thresholds["organ_id"]) == set(features["organ_id"])
    for p in _visible(out / "stage_a"):
        json.loads(p.read_text())  # every per-volume result is complete JSON
    assert len(list(out.glob(".decisions.*.tmp.csv"))) == 1  # the complete file the kill kept from its name
    # the same command again: it resumes from stage_a/ (tests/test_solf_batch.py) and leaves no temporary file
    from custom.solf import batch

    batch.run(solf_datalist, out, workers=1, plots=False)
    assert not [p for p in out.rglob(".*") if p.is_file()] and (out / "decisions.csv").is_file()


def test_bundles_write_predictions_and_checkpoints_atomically():
    """Every SaveImaged in a bundle uses custom.transforms.AtomicNibabelWriter; every CheckpointSaver is atomic."""
    found = {"SaveImaged": 0, "saver": 0}

    def walk(node, where):
        if isinstance(node, dict):
            target = node.get("_target_", "")
            if target.endswith("SaveImaged"):
                found["SaveImaged"] += 1
                assert node.get("writer") == "custom.transforms.AtomicNibabelWriter", where
            if target.endswith("CheckpointSaver"):
                found["saver"] += 1
                assert target == "custom.handlers.AtomicCheckpointSaver", where
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for config in sorted((REPO / "bundles").glob("*/configs/*.json")):
        walk(json.loads(config.read_text()), config)
    assert found["SaveImaged"] >= 2 and found["saver"] >= 4


def test_atomic_checkpoint_saver_publishes_complete_files_only(tmp_path):
    """The saver used by the bundles: a failing save leaves no file under the checkpoint's name."""
    from ignite.engine import Engine

    from custom.handlers import AtomicCheckpointSaver

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net, "optimizer": opt}, file_prefix="train", save_interval=1, n_saved=1)
    saver.attach(engine)
    engine.run([0], max_epochs=2)
    assert [p.name for p in _visible(tmp_path)] == ["train_checkpoint_epoch=2.pt"]
    assert oct(os.stat(tmp_path / "train_checkpoint_epoch=2.pt").st_mode & 0o044) == oct(0o044)  # group/other can read

    class Unsaveable(torch.nn.Module):
        def state_dict(self, *a, **k):
            return {"w": torch.zeros(1), "bad": lambda: 0}  # torch.save fails on it mid-write

    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path / "b"), {"model": Unsaveable(), "optimizer": opt}, file_prefix="train", save_interval=1).attach(engine)
    with pytest.raises(Exception):
        engine.run([0], max_epochs=1)
    assert not (tmp_path / "b").exists() or _visible(tmp_path / "b") == []


def test_remove_temp_files_takes_only_what_a_killed_writer_left(tmp_path):
    from custom.atomic import _temp_name, remove_temp_files

    (tmp_path / "sub").mkdir()
    left = [_temp_name(tmp_path / "case.nii.gz"), _temp_name(tmp_path / "sub" / "stats.json")]  # as mkstemp made them
    kept = [tmp_path / n for n in (".hidden", ".notes.tmp", "case.nii.gz", "a.tmp.json", "sub/.x.tmp.csv")]
    for p in kept:
        p.write_text("user file")
    assert remove_temp_files(tmp_path) == 1 and not left[0].exists() and left[1].exists()
    assert remove_temp_files(tmp_path, recursive=True) == 1 and not left[1].exists()
    assert all(p.read_text() == "user file" for p in kept)
    assert remove_temp_files(tmp_path / "missing") == 0
