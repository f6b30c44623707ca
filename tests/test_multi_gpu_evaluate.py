"""``multi_gpu_evaluate.json`` and ``multi_gpu_inference.json`` really run: ``torchrun --nproc_per_node=2``
on CPU (gloo); the merged metric tables equal a single-process evaluation, and the two ranks together
write every case's label map."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "swin_bob_btcv" / "configs"
TINY = {"feature_size": "12", "roi_size": "[64,64,64]", "pixdim": "[6,6,6]", "num_workers": "0", "sw_batch_size": "1",
        "validate#inferer#overlap": "0", "save_overlays": "False"}


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from monai.networks.nets import SwinUNETR

    root = tmp_path_factory.mktemp("mgpu_eval")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save({"model": SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict()}, root / "models" / "model.pt")
    return root


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def _torchrun() -> list[str]:
    return [shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun", "--nproc_per_node=2", "--standalone"]


@pytest.mark.slow
def test_two_rank_evaluation_merges_to_the_single_process_tables(bundle_root: Path, btcv_sample: Path, tmp_path: Path) -> None:
    files = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}'"
    common = ["--bundle_root", str(bundle_root), "--dataset_dir", str(btcv_sample),
              "--eval_datalist", "$@train_datalist + @val_datalist",  # the labelled CTs, dealt to two ranks
              *[f"--{k}={v}" for k, v in TINY.items()]]
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", files + "]",
          *common, "--output_dir", str(tmp_path / "single")], tmp_path)
    _run([*_torchrun(), "-m", "monai.bundle", "run", "--config_file", files + f",'{CONFIGS / 'multi_gpu_evaluate.json'}']",
          *common, "--output_dir", str(tmp_path / "multi")], tmp_path)
    for name in ("metrics_per_case.csv", "metrics_summary.csv"):
        single, multi = (tmp_path / d / name for d in ("single", "multi"))
        assert multi.read_text() == single.read_text(), name
    cases = {line.split(",")[0] for line in (tmp_path / "multi" / "metrics_per_case.csv").read_text().splitlines()[1:]}
    assert len(cases) == 3


@pytest.mark.slow
def test_two_rank_inference_writes_every_case(bundle_root: Path, btcv_sample: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(btcv_sample / "images" / "ct_abdomen_crop.nii.gz", images / f"{name}.nii.gz")
    _run([*_torchrun(), "-m", "monai.bundle", "run", "--config_file",
          f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'multi_gpu_inference.json'}']",
          "--bundle_root", str(bundle_root), "--input_path", str(images), "--output_dir", str(tmp_path / "out"),
          *[f"--{k}={v}" for k, v in TINY.items() if not k.startswith(("validate", "save"))]], tmp_path)
    written = sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz"))
    assert written == ["a_seg.nii.gz", "b_seg.nii.gz", "c_seg.nii.gz"]
    seg = nib.load(tmp_path / "out" / "a_seg.nii.gz")
    src = nib.load(images / "a.nii.gz")
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
