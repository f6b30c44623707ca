"""Modules split by dependency: the SOLF worker path, the command lines' argument parsing and the
export import neither MONAI nor torch (checked in a fresh interpreter that refuses to import them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# a sys.meta_path finder that raises on monai/torch, then the test's own code
BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("monai", "torch"):
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, _Block())
"""

#: modules that need only the standard library, NumPy/SciPy/pandas/numba or nibabel
LIGHT = [
    "custom.errors", "custom.atomic", "custom.checks", "custom.labels", "custom.parallel",
    "custom.solf.features", "custom.solf.kernels", "custom.solf.cohort", "custom.solf.batch",
    "custom.solf.reference", "custom.solf.qc", "custom.solf.simulate", "custom.solf.__main__",
    "custom.statistics", "custom.visualize", "custom.segment", "custom.export_bundle", "custom.sample_data",
]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_blocker_refuses_monai():
    res = _run("import monai")
    assert res.returncode != 0 and "blocked import of monai" in res.stderr


def test_light_modules_import_without_monai_or_torch():
    res = _run(f"import importlib\nfor m in {LIGHT!r}:\n    importlib.import_module(m)\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('monai', 'torch')))")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_solf_stage_a_runs_on_a_real_label_map_without_monai(ukbob_sample, tmp_path):
    label = ukbob_sample / "labels" / "ct_abdomen.nii.gz"
    code = f"""
import json
from custom.solf.batch import Item, StageAConfig, stage_a_volume
res = stage_a_volume(Item(volume="ct_abdomen", label={str(label)!r}), {str(tmp_path)!r}, StageAConfig())
print(json.dumps({{"error": res.get("error"), "organs": [r["organ_id"] for r in res.get("rows", [])]}}))
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] is None
    assert len(out["organs"]) >= 10 and 5 in out["organs"]  # the abdomen CT holds the liver (UKBOB id 5) among others
    assert len(list((tmp_path / "stage_a").glob("*.json"))) == 1


def test_solf_bad_label_is_one_line_input_error_without_monai(ukbob_sample, tmp_path):
    import nibabel as nib
    import numpy as np

    src = nib.load(str(ukbob_sample / "labels" / "ct_abdomen.nii.gz"))
    arr = np.asarray(src.dataobj).astype(np.uint8)
    arr[0, 0, 0] = 99
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(arr, src.affine), str(bad))
    code = f"""
from custom.solf.batch import Item, StageAConfig, stage_a_volume
print(stage_a_volume(Item(volume="bad", label={str(bad)!r}), {str(tmp_path / 'out')!r}, StageAConfig())["error"])
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr[-2000:]
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{bad}: label id(s) [99] are outside the taxonomy") and ". Fix: remap the labels to UKBOB ids" in line
