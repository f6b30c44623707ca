"""Interrupted training resumes: a real ``python -m monai.bundle run`` is killed (SIGKILL) after it has
written a training checkpoint; ``--resume true`` continues from that epoch, not from epoch 1.

The BraTS bundle's ``train.json`` (tiny: SwinUNETR feature_size 12, one 64x32x32 crop per epoch -
the smallest whose bottleneck still has 2 voxels for instance norm - at 4 mm); every bundle's ``train.json`` has the same ``checkpoint_saver`` / ``checkpoint_loader`` /
``resume`` ids, checked below.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_bob_brats"
EPOCHS = 2
TINY = {
    "network_def#feature_size": 12, "roi_size": [64, 32, 32], "pixdim": [4.0, 4.0, 4.0], "num_samples": 1,
    "num_workers": 0, "cache_rate": 0.0, "val_interval": 100, "warmup_epochs": 0, "epochs": EPOCHS,
}
STATE_KEYS = {"model", "optimizer", "lr_scheduler", "trainer"}


def _command(root: Path, **extra) -> list[str]:
    args = {**TINY, "ckpt_dir": str(root / "models"), "output_dir": str(root / "eval"), **extra}
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.json"),
            "--bundle_root", str(BUNDLE)] + [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items()]


def _epochs_logged(log: str) -> list[int]:
    """Epoch numbers of MONAI StatsHandler's iteration lines ``Epoch: 3/6, Iter: 1/1 -- train_loss: ...``."""
    return [int(m) for m in re.findall(rf"Epoch: (\d+)/{EPOCHS}, Iter:", log)]


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("train_checkpoint_epoch=*.pt"))


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(brats_sample, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SWIN_BOB_DATA": str(brats_sample.parent)}
    log1 = tmp_path / "run1.log"
    with open(log1, "w") as out:
        proc = subprocess.Popen(_command(tmp_path), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            ckpts = _checkpoints(tmp_path / "models")
            if ckpts:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: no clean shutdown, no final save
                break
            time.sleep(0.2)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log1.read_text()[-3000:]
    ckpts = _checkpoints(tmp_path / "models")
    assert len(ckpts) == 1  # n_saved=1, and the atomic saver leaves no half-written file under that name
    saved = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert set(saved) == STATE_KEYS
    trainer = saved["trainer"]  # ignite's Engine.state_dict: iteration, epoch_length, max_epochs
    killed_at = trainer["iteration"] // trainer["epoch_length"]
    assert 1 <= killed_at < EPOCHS
    assert ckpts[0].name == f"train_checkpoint_epoch={killed_at}.pt"
    assert saved["lr_scheduler"]["last_epoch"] == killed_at  # one iteration per epoch, stepped per iteration

    run2 = subprocess.run(_command(tmp_path, resume="true"), cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    log2 = run2.stdout + run2.stderr
    assert run2.returncode == 0, log2[-3000:]
    assert f"resuming from {ckpts[0]}" in log2
    epochs = _epochs_logged(log2)
    assert epochs == list(range(killed_at + 1, EPOCHS + 1)), epochs  # continues; epoch 1 is not run again
    final = torch.load(tmp_path / "models" / f"train_checkpoint_epoch={EPOCHS}.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == EPOCHS * final["trainer"]["epoch_length"] == EPOCHS
    assert final["lr_scheduler"]["last_epoch"] == EPOCHS
    moved = [not torch.equal(final["model"][k], saved["model"][k]) for k in saved["model"] if saved["model"][k].is_floating_point()]
    assert any(moved)  # the resumed epochs trained the restored weights


def test_every_bundle_checkpoints_full_training_state_and_can_resume():
    bundles = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())
    assert bundles
    for bundle in bundles:
        cfg = json.loads((bundle / "configs" / "train.json").read_text())
        assert cfg["resume"] is False, bundle.name
        saver, loader = cfg["train"]["checkpoint_saver"], cfg["train"]["checkpoint_loader"]
        assert saver["_target_"] == "custom.handlers.AtomicCheckpointSaver" and set(saver["save_dict"]) == STATE_KEYS, bundle.name
        assert saver["save_interval"] == "@ckpt_interval" and saver["n_saved"] >= 1, bundle.name
        assert loader["_target_"] == "custom.transfer.SafeCheckpointLoader" and set(loader["load_dict"]) == STATE_KEYS
        assert "$@train#checkpoint_loader.attach(@train#trainer) if custom.errors.config_flag(@resume, 'resume') else None" in cfg["run"], bundle.name
        multi = bundle / "configs" / "multi_gpu_train.json"
        if multi.is_file():
            assert any("checkpoint_saver.attach" in r for r in json.loads(multi.read_text())["run"]), bundle.name


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    from custom.errors import InputError
    from custom.transfer import latest_checkpoint

    with pytest.raises(InputError, match="no training checkpoint .* to resume from. Fix: start without --resume true"):
        latest_checkpoint(tmp_path)
    for epoch in (2, 10, 9):
        (tmp_path / f"train_checkpoint_epoch={epoch}.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).endswith("train_checkpoint_epoch=10.pt")  # by epoch, not by name
