"""``python -m custom.export_bundle``: a self-contained, checked copy of a bundle, written atomically."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from custom.export_bundle import DEFAULT_SCHEMA as SCHEMA, MAX_FILE_BYTES, export_bundle, main
from custom.errors import InputError

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
                "large_files.yml", "custom/__init__.py", "custom/labels.py", "custom/io.py", "custom/transfer.py"):
        assert (exported / rel).is_file(), rel
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
