"""``python -m custom.export_bundle``: a self-contained, checked copy of a bundle, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from custom.errors import InputError
from custom.export_bundle import DEFAULT_SCHEMA as SCHEMA, IGNORE, MAX_FILE_BYTES, PACKAGE, export_bundle, import_closure, main

REPO = Path(__file__).resolve().parents[1]
BTCV = REPO / "bundles" / "swin_bob_btcv"
QUICK = {"feature_size": 12}  # verify_net_in_out on a small network; the layout checked is the same


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    return export_bundle("swin_bob_btcv", out, schema=SCHEMA, net_override=QUICK)


def _copy_bundle(tmp: Path) -> Path:
    src = tmp / "src" / "swin_bob_btcv"
    shutil.copytree(BTCV, src, ignore=shutil.ignore_patterns("*.pt", "eval", "runs", "mlruns"))
    return src


@pytest.mark.slow
def test_export_is_self_contained(exported: Path) -> None:
    assert exported.name == "swin_bob_btcv"
    for rel in ("configs/inference.json", "configs/train.json", "configs/metadata.json", "docs/README.md",
                "large_files.yml", "custom/__init__.py", "custom/labels.py", "custom/errors.py", "custom/transfer.py",
                "custom/etta/inferer.py"):
        assert (exported / rel).is_file(), rel
    for rel in ("custom/demo.py", "custom/sample_data.py", "custom/parallel.py", "custom/segment.py", "custom/io.py",
                "custom/solf", "custom/auto3dseg"):  # nothing the configs do not import
        assert not (exported / rel).exists(), rel
    assert not list(exported.rglob("__pycache__"))
    assert not list(exported.rglob("*.pt"))  # weights come from large_files.yml, not the export
    assert max(p.stat().st_size for p in exported.rglob("*") if p.is_file()) <= MAX_FILE_BYTES
    assert [p.name for p in exported.parent.iterdir()] == ["swin_bob_btcv"]  # no temporary folder left
    # run from the bundle root, a clean interpreter imports the copied package (MONAI Label does the same)
    proc = subprocess.run([sys.executable, "-c", "import custom, custom.labels; print(custom.__file__)"],
                          cwd=exported, capture_output=True, text=True, check=True)
    assert Path(proc.stdout.strip()).resolve() == (exported / "custom" / "__init__.py").resolve()


def test_version_must_be_in_changelog(tmp_path: Path) -> None:
    src = _copy_bundle(tmp_path)
    meta = json.loads((src / "configs/metadata.json").read_text())
    meta["version"] = "9.9.9"
    (src / "configs/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="version 9.9.9 is not in `changelog`"):
        export_bundle(src, tmp_path / "out", schema=SCHEMA, check_net=False)
    assert not (tmp_path / "out" / "swin_bob_btcv").exists()


def test_file_over_25_mb_is_rejected_unless_listed(tmp_path: Path) -> None:
    src = _copy_bundle(tmp_path)
    with open(src / "docs" / "huge.bin", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="docs/huge.bin.*over the Model Zoo limit of 25 MB"):
        export_bundle(src, out, schema=SCHEMA, check_net=False)
    assert list(out.iterdir()) == []  # the temporary copy is gone too
    (src / "large_files.yml").write_text("large_files:\n  - path: docs/huge.bin\n    url: https://example.org/huge.bin\n"
                                         "    hash_val: ''\n    hash_type: sha256\n")
    dest = export_bundle(src, out, schema=SCHEMA, check_net=False)
    assert not (dest / "docs" / "huge.bin").exists()


def test_large_files_yml_is_checked(tmp_path: Path) -> None:
    src = _copy_bundle(tmp_path)
    (src / "large_files.yml").write_text("large_files:\n  - path: models/model.pt\n")
    with pytest.raises(InputError, match="entry 0 needs `path` and `url`"):
        export_bundle(src, tmp_path / "out", schema=SCHEMA, check_net=False)
    (src / "models").mkdir(exist_ok=True)
    (src / "models" / "model.pt").write_bytes(b"weights")
    (src / "large_files.yml").write_text("large_files:\n  - path: models/model.pt\n    url: ''\n    hash_val: '00'\n"
                                         "    hash_type: sha256\n")
    with pytest.raises(InputError, match="differs from large_files.yml"):
        export_bundle(src, tmp_path / "out", schema=SCHEMA, check_net=False)


def test_schema_violation_is_reported(tmp_path: Path) -> None:
    src = _copy_bundle(tmp_path)
    meta = json.loads((src / "configs/metadata.json").read_text())
    del meta["network_data_format"]
    (src / "configs/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="fails the bundle metadata schema"):
        export_bundle(src, tmp_path / "out", schema=SCHEMA, check_net=False)


def test_cli_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no_such_bundle", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no_such_bundle: not a bundle folder")
    assert "swin_bob_btcv" in err[0]


@pytest.mark.slow
def test_ckpt_export_torchscript(exported: Path, tmp_path: Path) -> None:
    """What each bundle README states: TorchScript by tracing works, scripting SwinUNETR does not."""
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    parser = ConfigParser()
    parser.read_config(str(exported / "configs" / "inference.json"))
    parser.update({"bundle_root": str(exported), **QUICK})
    net = parser.get_parsed_content("network_def").eval()
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    common = dict(net_id="network_def", ckpt_file=str(tmp_path / "model.pt"), key_in_ckpt="model",
                  meta_file=str(exported / "configs" / "metadata.json"),
                  config_file=str(exported / "configs" / "inference.json"), bundle_root=str(exported), **QUICK)
    ckpt_export(filepath=str(tmp_path / "model.ts"), use_trace=True, input_shape=[1, 1, 64, 64, 64], **common)
    traced = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(1, 1, 64, 64, 64)  # traced in train mode: 64 is the smallest size InstanceNorm accepts
    with torch.no_grad():
        assert torch.allclose(traced(x), net(x), atol=1e-5)
    with pytest.raises(Exception, match="variable number of arguments|keyword-only"):
        ckpt_export(filepath=str(tmp_path / "scripted.ts"), **common)


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files a copytree with the export's IGNORE would copy."""
    skip = set()
    for root in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        skip |= {root / n for n in IGNORE(str(root), [c.name for c in root.iterdir()])}
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not any(s in skip for s in (p, *p.parents)))


def test_export_ships_only_the_import_closure():
    files = {p.as_posix() for p in import_closure(BTCV / "configs")}
    assert {"__init__.py", "transforms.py", "handlers.py", "errors.py", "atomic.py", "checks.py", "etta/__init__.py",
            "etta/inferer.py", "bundle_utils.py", "dicom_seg.py", "visualize.py"} <= files
    assert not any(f.startswith(("solf/", "auto3dseg/")) or f in {"demo.py", "sample_data.py", "parallel.py", "segment.py"}
                   for f in files)
    ukbob = {p.as_posix() for p in import_closure(REPO / "bundles" / "swin_bob_ukbob" / "configs")}
    assert {"solf/transforms.py", "solf/batch.py", "solf/kernels.py", "parallel.py", "losses.py"} <= ukbob  # solf.json's runner


@pytest.mark.slow
def test_export_is_smaller_than_a_copy_of_the_whole_package(exported: Path) -> None:
    whole = _tree_bytes(exported) - _tree_bytes(exported / "custom") + _tree_bytes(PACKAGE)  # the export before
    now = _tree_bytes(exported)
    print(f"exported swin_bob_btcv: {now / 1024:.0f} KiB with the import closure, {whole / 1024:.0f} KiB with the "
          f"whole package ({whole / now:.1f}x); custom/: {_tree_bytes(exported / 'custom') / 1024:.0f} KiB of "
          f"{_tree_bytes(PACKAGE) / 1024:.0f} KiB")
    assert whole / now >= 1.9


_RUN_EXPORTED = """
import json, os, sys
sys.path.insert(0, os.getcwd())  # the bundle folder, as `python -m monai.bundle run` there and MONAI Label put it
repo, image, out, ckpt_dir, schema = sys.argv[1:6]
tiny = json.loads(sys.argv[6])
venv = os.path.realpath(sys.prefix)  # a venv inside the clone (make's .venv) is not the repository
on_repo = [p for p in sys.path if (r := os.path.realpath(p or ".")) == repo or r.startswith(repo + os.sep) and not r.startswith(venv + os.sep)]
assert not on_repo, sys.path
import torch
from monai.bundle import ConfigParser, run, verify_metadata
parser = ConfigParser()
parser.read_config("configs/inference.json")
parser.update({"bundle_root": os.getcwd(), **tiny})
torch.manual_seed(0)
torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, os.path.join(ckpt_dir, "model.pt"))
run(config_file="configs/inference.json", meta_file="configs/metadata.json", logging_file="configs/logging.conf",
    bundle_root=os.getcwd(), input_path=image, output_dir=out, ckpt_dir=ckpt_dir, **tiny)
verify_metadata(meta_file="configs/metadata.json", filepath=schema)
print(json.dumps({n: m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "custom"}))
"""


@pytest.mark.slow
def test_exported_bundle_runs_inference_from_its_own_folder(exported: Path, btcv_sample: Path, tmp_path: Path) -> None:
    """A fresh isolated interpreter (-I: no PYTHONPATH, no user site), the repository on no path entry."""
    import nibabel as nib

    image = btcv_sample / "images" / "ct_abdomen_crop.nii.gz"
    tiny = {"feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [6.0, 6.0, 6.0], "sw_batch_size": 1, "num_workers": 0,
            "sliding_window_inferer#overlap": 0.0}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _RUN_EXPORTED, str(REPO), str(image), str(tmp_path / "pred"), str(tmp_path),
         str(SCHEMA), json.dumps(tiny)], cwd=exported, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "custom.transforms" in modules and "custom.etta" in modules
    assert all(Path(f).resolve().is_relative_to(exported.resolve()) for f in modules.values() if f), modules
    pred = nib.load(tmp_path / "pred" / "ct_abdomen_crop_seg.nii.gz")
    src = nib.load(image)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(14))
