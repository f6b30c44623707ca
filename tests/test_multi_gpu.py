"""``multi_gpu_train.json`` really runs: ``torchrun --nproc_per_node=2`` on CPU (gloo), one tiny epoch,
for the BTCV bundle and the UKBOB pre-training bundle.

Only rank 0 may write checkpoints and logs: one process id in the TensorBoard file names, one
``train_loss`` line per rank-0 iteration, and a checkpoint without DDP's ``module.`` prefix.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: bundle -> (sample fixture, input channels, output channels, bundle-specific overrides)
CASES = {
    "swin_bob_btcv": ("btcv_sample", 1, 14, {}),
    # the raw labels (no SOLF decisions table needed): the two training volumes, one per rank
    "swin_bob_ukbob": ("ukbob_sample", 4, 73, {"use_solf": "False", "warmup_epochs": "0"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", list(CASES))
def test_torchrun_two_processes_rank0_writes(tmp_path, bundle, request):
    sample, in_channels, out_channels, extra = CASES[bundle]
    configs = REPO / "bundles" / bundle / "configs"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    overrides = {
        "feature_size": "12", "roi_size": "[64,64,64]", "pixdim": "[6,6,6]", "epochs": "1", "val_interval": "1",
        "num_workers": "0", "num_samples": "1", "sw_batch_size": "1", "cache_rate": "0",
        "validate#inferer#overlap": "0",
        # two validation cases so that each rank has one (DistributedSampler, even_divisible=False)
        "val_datalist": "$@train_datalist",
        **extra,
    }
    cmd = [
        torchrun, "--nproc_per_node=2", "--standalone", "-m", "monai.bundle", "run",
        "--config_file", f"['{configs / 'train.json'}','{configs / 'multi_gpu_train.json'}']",
        "--logging_file", str(configs / "logging.conf"), "--bundle_root", str(tmp_path),
        "--dataset_dir", str(request.getfixturevalue(sample)), *[f"--{k}={v}" for k, v in overrides.items()],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]

    # both ranks trained: each logs that its trainer finished
    assert len(re.findall(r"SupervisedTrainer - INFO - Engine run finished", log)) == 2, log[-3000:]
    # 2 training cases / 2 ranks = 1 iteration per rank; only rank 0 logs it
    assert len(re.findall(r"train_loss: [0-9.]+", log)) == 1, log[-3000:]
    events = sorted((tmp_path / "eval").glob("events.out.tfevents.*"))
    assert len(events) == 2  # trainer and evaluator writers of rank 0
    pids = {re.search(r"\.(\d+)\.\d+$", e.name).group(1) for e in events}
    assert len(pids) == 1, [e.name for e in events]  # written by one process
    model = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)  # bare state_dict
    assert not any(k.startswith("module.") for k in model)
    from monai.networks.nets import SwinUNETR

    SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=12).load_state_dict(model)
