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

import contextlib
import io
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
from typing import Sequence

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
# `python -m monailabel.main` = the `monailabel` command, whose shell wrapper runs whatever `python` is on PATH
MONAILABEL = [str(LABEL_VENV / "bin" / "python"), "-m", "monailabel.main"]


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(proc: subprocess.Popen, url: str, log: Path, what: str) -> bytes:
    """GET ``url`` until it answers; fail with the end of ``log`` if ``proc`` dies or STARTUP_S pass."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            return _request(url, timeout=10)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not up after {STARTUP_S} s: {log.read_text()[-3000:]}")
            time.sleep(1)


@contextlib.contextmanager
def _process(cmd: list[str], log_path: Path, **kwargs):
    """Run ``cmd`` with its output in ``log_path``; always stopped (terminate, then kill) at the end."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MONAI Label's ``monaibundle`` sample app with the three bundles exported into it, made tiny."""
    if not (LABEL_VENV / "bin" / "monailabel").is_file():
        pytest.fail(f"{LABEL_VENV} has no monailabel: run `make test-label` (it builds the venv with scripts/label_env.sh)")
    tmp = tmp_path_factory.mktemp("monailabel_app")
    subprocess.run([*MONAILABEL, "apps", "--download", "--name", "monaibundle", "--output", str(tmp / "apps")],
                   check=True, capture_output=True)
    app = tmp / "apps" / "monaibundle"
    for name in PRESENT:
        # the network check runs on the full-size bundle configs (one forward pass at feature_size 12)
        _make_tiny(export_bundle(name, app / "model", net_override={"feature_size": 12}))
    return app


@contextlib.contextmanager
def _monailabel(app: Path, studies: str, tmp: Path, models: Sequence[str] = PRESENT, **env_extra: str):
    """A MONAI Label server on 127.0.0.1 serving ``models`` of ``app`` over ``studies`` (folder or DICOMweb URL)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # LABEL_VENV/bin first on PATH: dcmqi's itkimage2segimage (else MONAI Label downloads it from GitHub)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2", PATH=f"{LABEL_VENV / 'bin'}:{env.get('PATH', '')}", **env_extra)
    cmd = [*MONAILABEL, "start_server", "--app", str(app), "--studies", studies,
           "--host", "127.0.0.1", "--port", str(port), "--conf", "models", ",".join(models),
           "--conf", "sam2", "false", "--conf", "zoo_source", "github", "--conf", "preload", "false"]
    with _process(cmd, tmp / "server.log", env=env, cwd=tmp) as proc:
        url = f"http://127.0.0.1:{port}"
        info = json.loads(_wait_up(proc, url + "/info/", tmp / "server.log", "monailabel"))
        yield {"url": url, "info": info, "app": app, "log": tmp / "server.log"}


@pytest.fixture(scope="module")
def server(app: Path, btcv_sample: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("monailabel")
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(btcv_sample / "images" / "ct_abdomen.nii.gz", studies / "ct_abdomen.nii.gz")
    shutil.copy(btcv_sample / "images" / "ct_abdomen_crop.nii.gz", studies / "ct_abdomen_crop.nii.gz")
    shutil.copy(btcv_sample / "labels" / "ct_abdomen_crop.nii.gz", studies / "labels" / "final" / "ct_abdomen_crop.nii.gz")
    with _monailabel(app, str(studies), tmp) as srv:
        yield {**srv, "studies": studies}


# ---------------------------------------------------------------- PACS round trip
def _orthanc_plugins() -> list[str]:
    """The DICOMweb and GDCM plugin libraries as their Debian packages list them."""
    libs = []
    for package, stem in (("orthanc-dicomweb", "libOrthancDicomWeb"), ("orthanc-gdcm", "libOrthancGdcm")):
        proc = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        found = sorted(line for line in proc.stdout.splitlines() if Path(line).name.startswith(stem + ".so"))
        if proc.returncode or not found:
            pytest.fail(f"{package} is not installed: run `make test-label` (scripts/label_system.sh installs it)")
        libs.append(found[0])
    return libs


@contextlib.contextmanager
def _orthanc(tmp: Path):
    """Orthanc on 127.0.0.1 (HTTP only, no DICOM port) with DICOMweb; storage in ``tmp``; stopped at the end.

    GDCM's plugin transcodes the sample series' JPEG 2000 when a WADO-RS client asks for the default
    transfer syntax (Orthanc alone answers "Cannot transcode image")."""
    orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(orthanc).is_file():
        pytest.fail("Orthanc is not installed: run `make test-label` (scripts/label_system.sh installs it)")
    port = _free_port()
    config = {
        "Name": "swin_bob_test", "StorageDirectory": str(tmp / "orthanc_db"), "IndexDirectory": str(tmp / "orthanc_db"),
        "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": False,
        "Plugins": _orthanc_plugins(), "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp / "orthanc.json").write_text(json.dumps(config, indent=4))
    with _process([orthanc, str(tmp / "orthanc.json")], tmp / "orthanc.log") as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_up(proc, url + "/system", tmp / "orthanc.log", "Orthanc")
        yield url


def _get(url: str, accept: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=120) as resp:
        return resp.read(), resp.headers["Content-Type"]


def _multipart_form(fields: dict[str, tuple[str | None, bytes, str]]) -> tuple[bytes, str]:
    """``{name: (filename or None, data, content type)}`` -> (body, content type) of a multipart/form-data POST/PUT."""
    boundary = "swinbob" + os.urandom(8).hex()
    body = b""
    for name, (filename, data, ctype) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The payloads of a multipart/related answer (WADO-RS)."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        payload = chunk.partition(b"\r\n\r\n")[2]
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


@pytest.mark.label
def test_pacs_round_trip(app: Path, btcv_sample: Path, tmp_path: Path) -> None:
    """Orthanc holds the sample CT series; MONAI Label (``--studies`` = Orthanc's DICOMweb root) segments
    it with the BTCV bundle; the label saved as ``final`` comes back from Orthanc as a DICOM-SEG of
    that series, on its geometry, voxel for voxel the label MONAI Label returned."""
    import pydicom

    from custom.dicom_seg import dcmqi_label_info, label_to_frames, read_series
    from custom.labels import BTCV_LABELS, SEGMENT_CODES

    series_dir = btcv_sample / "dicom" / "ct_dicom"
    sources = read_series(series_dir)  # ordered along the normal
    study_uid, series_uid = sources[0].StudyInstanceUID, sources[0].SeriesInstanceUID
    with _orthanc(tmp_path) as pacs:
        for path in sorted(series_dir.iterdir()):
            _request(pacs + "/instances", "POST", path.read_bytes(), content_type="application/dicom")
        found = json.loads(_request(f"{pacs}/dicom-web/series?SeriesInstanceUID={series_uid}&includefield=00201209"))
        assert len(found) == 1 and found[0]["00201209"]["Value"] == [20]  # one series of 20 images, over QIDO-RS

        env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "dicomweb_cache"),
               "MONAI_LABEL_DATASTORE_CACHE_PATH": str(tmp_path / "dicomweb_cache")}
        with _monailabel(app, pacs + "/dicom-web", tmp_path, models=["swin_bob_btcv"], **env) as srv:
            assert json.loads(_call(srv, "/datastore/?output=stats"))["total"] == 1  # the series, found over QIDO-RS
            body = _call(srv, f"/infer/swin_bob_btcv?image={series_uid}&output=image", {"device": "cpu"}, form=True)
            pred_file = tmp_path / "pred.nii.gz"
            pred_file.write_bytes(body)
            pred = nib.load(pred_file)
            assert pred.shape == (512, 512, 20)
            frames = label_to_frames(np.asarray(pred.dataobj), pred.affine, sources)  # InputError if off the series grid
            ids = [int(i) for i in np.unique(frames) if i]
            assert ids, "the tiny random network predicted background only"
            params = json.dumps({"label_info": dcmqi_label_info(ids, BTCV_LABELS, "swin_bob_btcv")}).encode()
            form, ctype = _multipart_form({"params": (None, params, "application/json"),
                                           "label": ("pred.nii.gz", pred_file.read_bytes(), "application/gzip")})
            try:  # tag final: MONAI Label's DICOMweb datastore writes DICOM-SEG (dcmqi) and STOWs it
                _request(f"{srv['url']}/datastore/label?image={series_uid}&tag=final", "PUT", form, content_type=ctype)
            except urllib.error.HTTPError as exc:
                pytest.fail(f"save label: HTTP {exc.code} {exc.read()[:500]!r}\n{srv['log'].read_text()[-4000:]}")

        segs = json.loads(_request(f"{pacs}/dicom-web/series?Modality=SEG&includefield=0020000D"))
        assert len(segs) == 1 and segs[0]["0020000D"]["Value"] == [study_uid]
        seg_series = segs[0]["0020000E"]["Value"][0]
        body, ctype = _get(f"{pacs}/dicom-web/studies/{study_uid}/series/{seg_series}",
                           'multipart/related; type="application/dicom"')
        parts = _multipart_parts(body, ctype)
        assert len(parts) == 1
        seg = pydicom.dcmread(io.BytesIO(parts[0]))

    # the SEG against the series: references, frame of reference, geometry, codes, pixels
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    by_sop = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= set(by_sop)
    assert (seg.Rows, seg.Columns) == (sources[0].Rows, sources[0].Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in sources[0].ImageOrientationPatient], atol=1e-4)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in sources[0].PixelSpacing], atol=1e-4)
    number_to_id = {}
    for segment in seg.SegmentSequence:
        label_id = {v: k for k, v in BTCV_LABELS.items()}[segment.SegmentLabel]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == SEGMENT_CODES[segment.SegmentLabel].type[1]
        number_to_id[segment.SegmentNumber] = label_id
    assert sorted(number_to_id.values()) == ids
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    covered = {i: np.zeros(frames.shape, bool) for i in ids}
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        k = by_sop[group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in sources[k].ImagePositionPatient], atol=1e-3)
        label_id = number_to_id[group.SegmentIdentificationSequence[0].ReferencedSegmentNumber]
        assert np.array_equal(pixels[f] > 0, frames[k] == label_id)
        covered[label_id][k] = pixels[f] > 0
    for label_id in ids:  # frames the SEG left out are empty for that segment
        assert np.array_equal(covered[label_id], frames == label_id)


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

    from custom.etta import EntropyTTAInferer, FlipTTAInferer

    parser = _label_parser("swin_bob_btcv")
    options = parser.get_parsed_content("displayable_configs", instantiate=True)
    assert options == {"use_etta": False, "use_tta": False}  # what MONAI Label shows the client
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
    parser["displayable_configs"].update({"use_etta": False, "use_tta": True})
    parser.parse()
    assert isinstance(parser.get_parsed_content("inferer"), FlipTTAInferer)
