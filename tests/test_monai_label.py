"""MONAI Label serves the three bundles: a real server in its own venv, driven over its REST API.

The server tests (marker ``label``) run with ``make test-label`` (it builds ``.venv-label`` with
``scripts/label_env.sh`` first); ``make test`` deselects them and runs the two tests without a
server: the bundles' pipeline on a data dict as MONAI Label 0.8.5 builds it, in this venv's MONAI.

The bundles are exported with ``custom.export_bundle`` into the ``monaibundle`` sample app's
``model/`` folder (local bundles, so nothing is downloaded), then made small for a CPU
(feature_size 12, ROI 64^3, 6 mm voxels: the same ids a user overrides on the command line) and
given freshly initialised ``models/model.pt`` weights. The test segments the real sample CT
with the BTCV bundle and runs one training epoch on a labelled study.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.export_bundle import export_bundle

REPO = Path(__file__).resolve().parents[1]
LABEL_VENV = Path(os.environ.get("SWIN_BOB_LABEL_VENV", REPO / ".venv-label"))
BUNDLES = ("swin_bob_btcv", "swin_bob_ukbob", "swin_bob_brats")
PRESENT = [b for b in BUNDLES if (REPO / "bundles" / b / "configs" / "metadata.json").is_file()]
TINY = {"feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [6.0, 6.0, 6.0], "sw_batch_size": 1,
        "num_samples": 1, "num_workers": 0, "cache_rate": 0.0, "epochs": 1}
STARTUP_S = 300


def _request(url: str, method: str = "GET", data: bytes | None = None, timeout: float = 600,
             content_type: str = "application/json") -> bytes:
    req = urllib.request.Request(url, method=method, data=data, headers={"Content-Type": content_type} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _call(server: dict, path: str, params: dict | None = None, form: bool = False) -> bytes:
    """POST ``params`` (JSON body, or the form field ``params`` that /infer reads), or GET without;
    a failure shows the end of the server log."""
    try:
        if params is None:
            return _request(server["url"] + path)
        if form:
            data = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
            return _request(server["url"] + path, "POST", data, content_type="application/x-www-form-urlencoded")
        return _request(server["url"] + path, "POST", json.dumps(params).encode())
    except urllib.error.HTTPError as exc:
        pytest.fail(f"{path}: HTTP {exc.code} {exc.read()[:500]!r}\n{server['log'].read_text()[-4000:]}")


def _make_tiny(bundle: Path) -> None:
    """Small-network overrides in the exported configs, and random initial weights to serve."""
    import torch
    from monai.bundle import ConfigParser

    for name in ("inference.json", "train.json"):
        path = bundle / "configs" / name
        if path.is_file():
            config = json.loads(path.read_text())
            config.update({k: v for k, v in TINY.items() if k in config})
            path.write_text(json.dumps(config, indent=4))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    (bundle / "models").mkdir(exist_ok=True)
    torch.save({"model": net.state_dict()}, bundle / "models" / "model.pt")


@pytest.fixture(scope="module")
def server(btcv_sample: Path, tmp_path_factory: pytest.TempPathFactory):
    if not (LABEL_VENV / "bin" / "monailabel").is_file():
        pytest.fail(f"{LABEL_VENV} has no monailabel: run `make test-label` (it builds the venv with scripts/label_env.sh)")
    tmp = tmp_path_factory.mktemp("monailabel")
    # `python -m monailabel.main` = the `monailabel` command, whose shell wrapper runs whatever `python` is on PATH
    monailabel = [str(LABEL_VENV / "bin" / "python"), "-m", "monailabel.main"]
    subprocess.run([*monailabel, "apps", "--download", "--name", "monaibundle",
                    "--output", str(tmp / "apps")], check=True, capture_output=True)
    app = tmp / "apps" / "monaibundle"
    for name in PRESENT:
        # the network check runs on the full-size bundle configs (one forward pass at feature_size 12)
        _make_tiny(export_bundle(name, app / "model", net_override={"feature_size": 12}))

    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(btcv_sample / "images" / "ct_abdomen.nii.gz", studies / "ct_abdomen.nii.gz")
    shutil.copy(btcv_sample / "images" / "ct_abdomen_crop.nii.gz", studies / "ct_abdomen_crop.nii.gz")
    shutil.copy(btcv_sample / "labels" / "ct_abdomen_crop.nii.gz", studies / "labels" / "final" / "ct_abdomen_crop.nii.gz")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    proc = subprocess.Popen(
        [*monailabel, "start_server", "--app", str(app), "--studies", str(studies),
         "--host", "127.0.0.1", "--port", str(port), "--conf", "models", ",".join(PRESENT),
         "--conf", "sam2", "false", "--conf", "zoo_source", "github", "--conf", "preload", "false"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel exited with {proc.returncode}: {(tmp / 'server.log').read_text()[-3000:]}")
            try:
                info = json.loads(_request(url + "/info/", timeout=10))
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"monailabel not up after {STARTUP_S} s: {(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(2)
        yield {"url": url, "info": info, "app": app, "studies": studies, "log": tmp / "server.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.label
def test_three_bundles_load(server) -> None:
    info = server["info"]
    assert PRESENT == list(BUNDLES)
    for name in BUNDLES:
        assert name in info["models"], (name, sorted(info["models"]))
        assert name in info["trainers"], (name, sorted(info["trainers"]))
    btcv = info["models"]["swin_bob_btcv"]
    assert btcv["labels"]["liver"] == 6 and btcv["labels"]["spleen"] == 1 and len(btcv["labels"]) == 13
    assert len(info["models"]["swin_bob_ukbob"]["labels"]) == 72  # background is left out by MONAI Label
    assert info["models"]["swin_bob_btcv"]["version"] == json.loads(
        (server["app"] / "model/swin_bob_btcv/configs/metadata.json").read_text())["version"]


@pytest.mark.label
def test_segment_ct_with_btcv(server, btcv_sample: Path) -> None:
    body = _call(server, "/infer/swin_bob_btcv?image=ct_abdomen&output=image", {"device": "cpu"}, form=True)
    tmp = server["studies"].parent / "ct_abdomen_seg.nii.gz"
    tmp.write_bytes(body)
    label = nib.load(tmp)
    source = nib.load(btcv_sample / "images" / "ct_abdomen.nii.gz")
    assert label.shape == source.shape == (122, 101, 112)
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-3)
    ids = np.unique(np.asarray(label.dataobj))
    assert set(ids.tolist()) <= set(range(14)) and len(ids) >= 1


@pytest.mark.label
def test_one_training_epoch(server) -> None:
    import torch

    models = server["app"] / "model/swin_bob_btcv/models"
    params = {"max_epochs": 1, "val_split": 0.0, "device": "cpu", "multi_gpu": False, "pretrained": True}
    assert json.loads(_call(server, "/train/swin_bob_btcv?run_sync=true", params)) == {}
    assert "Training Finished" in server["log"].read_text()
    # train.json's CheckpointSaver keeps the trainer state each epoch; model.pt follows the best validation Dice
    ckpt = torch.load(models / "train_checkpoint_epoch=1.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 1 and ckpt["trainer"]["max_epochs"] == 1
    served = torch.load(models / "model.pt", weights_only=True)["model"]
    assert served.keys() == ckpt["model"].keys()
    assert any(not torch.equal(served[k], ckpt["model"][k]) for k in served)  # one optimiser step happened


# ---------------------------------------------------------------- without a server (make test)
# What MONAI Label 0.8.5 puts into the data dict of an inference request (monailabel/tasks/infer/
# basic_infer.py ``__call__``: the task config + the request + ``image_path``; interfaces/app.py
# ``infer``: ``description``, ``save_label``; endpoints/infer.py: ``model``, ``image`` and the params).
def _label_request(image: str, bundle: str) -> dict:
    return {"model": bundle, "image": image, "image_path": image, "device": "cpu", "description": "",
            "save_label": False, "model_filename": ["model.pt"], "use_etta": False}


def _label_parser(bundle: str):
    """The bundle's inference.json as MONAI Label's BundleInferTask reads it, made tiny."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(REPO / "bundles" / bundle),
                          **{k: v for k, v in TINY.items() if k in parser.config}})
    return parser


def _label_preprocessing(parser) -> list:
    from monai.transforms import LoadImaged

    pre = list(parser.get_parsed_content("preprocessing", instantiate=True).transforms)
    for t in pre:
        if isinstance(t, LoadImaged):
            t._loader.image_only = False  # as BundleInferTask.pre_transforms does
    return pre


@pytest.mark.parametrize("bundle,image", [
    ("swin_bob_btcv", "btcv_sample/images/ct_abdomen_crop.nii.gz"),
    ("swin_bob_ukbob", "ukbob_sample/images/ct_abdomen_crop.nii.gz"),
    ("swin_bob_brats", "brats_sample/images/brain2.nii.gz"),
])
def test_preprocessing_takes_monai_label_keys(bundle: str, image: str, btcv_sample: Path, ukbob_sample: Path,
                                              brats_sample: Path) -> None:
    from monai.transforms import Compose, Spacingd

    path = str(btcv_sample.parent / image)
    pre = _label_preprocessing(_label_parser(bundle))
    out = Compose(pre)(_label_request(path, bundle))
    assert out["image_path"] == path and out["image_meta_dict"]["filename_or_obj"] == path
    assert out["image"].pixdim.tolist() == pytest.approx(TINY["pixdim"])
    # MONAI 1.6's own Spacingd is what crashed on the same dict (it .update()s every image_* entry)
    plain = [Spacingd(keys="image", pixdim=TINY["pixdim"]) if type(t).__name__ == "SafeSpacingd" else t for t in pre]
    with pytest.raises(RuntimeError, match="Spacingd"):
        Compose(plain)(_label_request(path, bundle))


def test_btcv_inference_on_a_monai_label_request(btcv_sample: Path) -> None:
    """pre-processing -> inferer -> post-processing (less SaveImaged, as MONAI Label filters it) of the
    BTCV bundle on MONAI Label's data dict; ``use_etta`` switched through ``displayable_configs``."""
    import torch
    from monai.transforms import Compose, SaveImaged

    from custom.etta import EntropyTTAInferer

    parser = _label_parser("swin_bob_btcv")
    options = parser.get_parsed_content("displayable_configs", instantiate=True)
    assert options == {"use_etta": False}  # what MONAI Label shows the client
    path = str(btcv_sample / "images" / "ct_abdomen_crop.nii.gz")
    request = _label_request(path, "swin_bob_btcv")
    data = Compose(_label_preprocessing(parser))(request)
    net = parser.get_parsed_content("network_def").eval()
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], net)[0]
    post = [t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)]
    out = Compose(post)(data)
    assert tuple(out["pred"].shape) == (1, 122, 101, 30)  # back on the input grid
    assert set(torch.unique(out["pred"]).tolist()) <= set(range(14))
    assert out["image_path"] == path

    # the client's choice: BundleInferTask writes it into displayable_configs and re-parses
    parser["displayable_configs"].update({"use_etta": True})
    parser.parse()
    assert isinstance(parser.get_parsed_content("inferer"), EntropyTTAInferer)
    cli = _label_parser("swin_bob_btcv")
    cli["use_etta"] = True  # `--use_etta true` on the command line still works
    assert isinstance(cli.get_parsed_content("inferer"), EntropyTTAInferer)
