"""custom.sample_data: checksummed sources, datasets with real content, clear errors."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from custom import labels as L
from custom import sample_data as S
from custom.atomic import sha256_file
from custom.errors import InputError


def test_btcv_sample_datalist_and_labels(btcv_sample):
    datalist = json.loads((btcv_sample / "dataset.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "test", "mr")] == [2, 1, 2, 1]
    label = nib.load(btcv_sample / datalist["validation"][0]["label"])
    image = nib.load(btcv_sample / datalist["validation"][0]["image"])
    assert label.shape == image.shape == (512, 512, 20)
    assert np.allclose(label.affine, image.affine)
    ids = set(np.unique(np.asanyarray(label.dataobj)).tolist())
    assert ids <= set(L.BTCV_LABELS) and {1, 6, 7, 8, 9} <= ids  # spleen, liver, stomach, aorta, IVC
    ct = nib.load(btcv_sample / datalist["training"][0]["label"])
    liver_ml = (np.asanyarray(ct.dataobj) == 6).sum() * np.prod(ct.header.get_zooms()) / 1000
    assert 800 < liver_ml < 3000  # a real adult liver
    assert (btcv_sample / "dicom" / "ct_dicom").is_dir() and len(list((btcv_sample / "dicom" / "ct_dicom").iterdir())) == 20


def test_ukbob_sample_has_four_dixon_channels(ukbob_sample):
    datalist = json.loads((ukbob_sample / "dataset.json").read_text())
    img = nib.load(ukbob_sample / datalist["training"][0]["image"])
    assert img.shape == (122, 101, 112, 4)
    fat, water, ip, op = np.moveaxis(np.asanyarray(img.dataobj), -1, 0)
    assert np.allclose(ip, fat + water) and np.allclose(op, np.abs(water - fat))
    label = np.asanyarray(nib.load(ukbob_sample / datalist["training"][0]["label"]).dataobj)
    assert label.max() <= 72 and {L.UKBOB_ID["aorta"], L.UKBOB_ID["liver"], L.UKBOB_ID["sacrum"]} <= set(np.unique(label).tolist())


def test_dixon_model_on_tissue_values():
    fat, water, ip, op = S.dixon_from_ct(np.array([-1000.0, -100.0, 50.0, 1000.0]))
    assert fat.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert water.tolist() == pytest.approx([0.0, 0.0, 1.0, 0.3])


def test_checksum_mismatch_is_one_clear_error(tmp_path):
    root = tmp_path / "cache"
    (root / "downloads").mkdir(parents=True)
    src = S.TOTALSEGMENTATOR
    shutil.copy(S.data_root() / "downloads" / src.archive, root / "downloads" / src.archive)
    bad = S.Sdist(src.name, src.version, "0" * 64, src.files)
    # pip re-downloads because the cached sha differs, then the fresh copy mismatches too
    with pytest.raises(InputError, match="sha256 mismatch"):
        S.fetch_sdist(bad, root)
    assert not (root / "raw").exists()


def test_offline_download_is_one_clear_error(tmp_path, monkeypatch):
    # an unreachable index is what an offline machine sees
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    src = S.Sdist("totalsegmentator", "2.18.0", S.TOTALSEGMENTATOR.sha256, {})
    with pytest.raises(InputError, match="pip could not download totalsegmentator==2.18.0"):
        S.fetch_sdist(src, tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(InputError, match="unknown sample dataset 'nope'"):
        S.prepare("nope")


def test_verified_raw_files(btcv_sample):
    raw = S.data_root() / "raw" / "totalsegmentator"
    for rel, sha in list(S.TOTALSEGMENTATOR.files.items())[:3]:
        assert sha256_file(raw / rel) == sha


def test_dicom_series_has_standard_uids(btcv_sample):
    import pydicom

    raw = S.data_root() / "raw" / "totalsegmentator" / S.DICOM_DIR
    files = sorted((btcv_sample / "dicom" / "ct_dicom").iterdir())
    study, series = S.sample_series_uids("1.3.12.2.1107.5.1.4.60064.30000022120807274275100000041")
    assert study == "1.2.826.0.1.3680043.8.498.92002038292778040489816471560350545824"  # the same on every machine
    instances = set()
    for path in files:
        ds, src = pydicom.dcmread(path), pydicom.dcmread(raw / path.name)
        assert src.SOPInstanceUID == "" and src.StudyInstanceUID == ""  # what the sdist ships
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == S.CT_IMAGE_STORAGE
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == path.name[3:]  # "CT.<uid>"
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
        assert ds.PixelData == src.PixelData and ds.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        changed = {e.keyword for e in ds if e.tag not in src or src[e.tag].value != e.value}
        assert changed == {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"}
        instances.add(ds.SOPInstanceUID)
    assert len(instances) == len(files) == 20


def test_old_cache_stamp_is_rebuilt(tmp_path):
    # a cache built before the UIDs existed (stamp "1", a plain copy of the series) is rebuilt
    src = S.TOTALSEGMENTATOR
    (tmp_path / "downloads").mkdir()
    shutil.copy(S.data_root() / "downloads" / src.archive, tmp_path / "downloads" / src.archive)
    old = tmp_path / "btcv_sample"
    (old / "dicom").mkdir(parents=True)
    (old / ".built").write_text("1")
    folder = S.prepare("btcv_sample", tmp_path)
    assert (folder / ".built").read_text() == "2"
    assert len(list((folder / "dicom" / "ct_dicom").iterdir())) == 20
    stamp_mtime = (folder / ".built").stat().st_mtime_ns
    S.prepare("btcv_sample", tmp_path)  # up to date: nothing rebuilt
    assert (folder / ".built").stat().st_mtime_ns == stamp_mtime
