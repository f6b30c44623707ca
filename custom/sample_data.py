"""Real sample volumes for demos and tests, fetched at set-up time from package source distributions.

Public BTCV / BraTS / UK Biobank data cannot be downloaded here; TotalSegmentator's Apache-2.0 sdist
carries real CT and MR volumes with automatic organ labels (``DATA.md``). This module downloads it
with pip into a cache, verifies the sha256 of every file it uses, and builds Decathlon-style
datasets (``dataset.json`` with ``training`` / ``validation`` / ``test``, paths relative to the
dataset folder):

- ``btcv_sample``: the real CTs relabelled to the 14 BTCV classes (the DICOM series converted to
  NIfTI; the series folder itself is kept for DICOM inference, with the four UIDs its anonymisation
  emptied filled in deterministically: :func:`standard_dicom_series`), plus the real MR for domain shift.
- ``ukbob_sample``: the same anatomy relabelled to the 73 UKBOB classes, with four Dixon-like
  channels derived from CT (see that folder's README: how, and why it is not real Dixon MRI).
- ``brats_sample``: real T1 post-contrast brain MRI from pyradiomics' BSD-3 sdist with derived
  T1 / T2 / FLAIR channels and BraTS 2023 sub-region labels derived from the lesion masks (that
  folder's README says exactly how; it is not BraTS data).

``python -m custom.sample_data [--root DIR]`` builds everything; ``SWIN_BOB_DATA`` sets the cache
(default ``~/.cache/swin_bob``). Building is atomic (temporary folder, then rename) and idempotent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np

from custom import labels as L
from custom.atomic import atomic_write_text, check_writable_dir, sha256_file
from custom.errors import InputError, exit_on_input_error

DATA_ENV = "SWIN_BOB_DATA"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``root``, else ``$SWIN_BOB_DATA``, else ``~/.cache/swin_bob``."""
    return Path(root or os.environ.get(DATA_ENV) or Path.home() / ".cache" / "swin_bob").expanduser()


@dataclass(frozen=True)
class Sdist:
    """A source distribution on PyPI and the files (with sha256) this project takes from it."""

    name: str
    version: str
    sha256: str
    files: Mapping[str, str] = field(default_factory=dict)  # path inside the archive -> sha256
    pip_args: tuple[str, ...] = ()

    @property
    def archive(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"


_TS_REF = "tests/reference_files"
# the 20 slices of the DICOM series: file name suffix -> sha256
_DICOM_PREFIX = "CT.1.3.12.2.1107.5.1.4.60064.300000221208081134280000"
_DICOM_SHA = {
    "16573": "4c5633409fa4d3edf6871e5684e9e1b10325b4d0949997582f43b23a684d0dc4",
    "16574": "9148f91127145497f4d6c6f0780f9452504cd7fe5088ec8f2bf2b21800c731ff",
    "16575": "3edaccec892e0821440cbefe3d5465923bb5146c316cbaf58f578d962f120484",
    "16576": "9b68685f0c5f9bfcfc2c397f4fadf431da288d7422ca72e7d9031d4e039418cd",
    "16577": "c8d2c0dc05e414d47d3652c658d8fecc20c3cf7ce106c10d84ad033d39700bcc",
    "16578": "0ee2c1d58e06cedd91483ca35c04da3c26fea0dbe88aaf1eaa950b57f38357d6",
    "16579": "c76cf0818d4215b92883d109b8a0b62ae0a4d81637eed98738f9c62b6f49bb72",
    "16580": "106e20514fd3ca66895e14dbfba96c01c1195e4ed890c035d4368dd71f3ee116",
    "16581": "5804e6c4a50f4d5b20040ac82a1c6d79cba5f7267d71f10b0a1b49eda1bc13ff",
    "16582": "bef219a16b22949224de4581a2d288863b2585d29556ac24021f03307378cb39",
    "16583": "9de5a49e880417d5330fe299115fdb95831a98234216a31c5c0e9a0be9a6dcd3",
    "16584": "fa00c8d81ec8aa0d0cfc4e05343782c3a75a4c60df8cccf9ff5db42ac454e61d",
    "16585": "ebba0900b0f728db0c94c769db3e5ca38a0cd916386a727541eb3e56350770e5",
    "16586": "f084ec95cfba25efb7cbe86e8b4966b051904037e8385f58fe398c5475693b89",
    "16587": "20a9b88a30ea8a824ac65cb19c1ebf80964b41ff476497706ff2a286e5f27a25",
    "16588": "2a515d3b60f3ff733aac1fc5414206c331e3ed2ccef8c2e0c30b844c538e3ed8",
    "16589": "5880669f1bc36b09cad4bdf487992ec415da0afa014e927efc282e612f467574",
    "16590": "7af4dd5b5766a87368939116b91f90d989820e7b2237fb9bcd10d47db0960875",
    "16591": "671306f4462ae881976c18c6a2d8a1567279fb0166ef0e9e8a41271fac9c1cbb",
    "16592": "fdb76ad5272f074e07cc81509604fd163f2f8a9903d34b16ba6f078250373c51",
}
DICOM_DIR = f"{_TS_REF}/example_ct_dicom"

TOTALSEGMENTATOR = Sdist(
    name="totalsegmentator",
    version="2.18.0",
    sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    files={
        f"{_TS_REF}/example_ct.nii.gz": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
        f"{_TS_REF}/example_seg_fast_force_split.nii.gz": "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
        f"{_TS_REF}/example_ct_sm.nii.gz": "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
        f"{_TS_REF}/example_seg.nii.gz": "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
        f"{_TS_REF}/example_mr_sm.nii.gz": "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f",
        f"{_TS_REF}/example_seg_mr.nii.gz": "e73a5ee12962aa2bb2f3e43ab58dfc67990c5a7ef2dcb426a1bf5e5982b9587f",
        f"{_TS_REF}/example_seg_dicom.nii.gz": "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc",
        f"{_TS_REF}/aorta_report/example_ct.nii.gz": "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
        **{f"{DICOM_DIR}/{_DICOM_PREFIX}{k}": v for k, v in _DICOM_SHA.items()},
    },
)

PYRADIOMICS = Sdist(
    name="pyradiomics",
    version="3.0.1",
    sha256="47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
    files={
        "data/brain1_image.nrrd": "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
        "data/brain1_label.nrrd": "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059",
        "data/brain2_image.nrrd": "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
        "data/brain2_label.nrrd": "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5",
    },
    # its setup.py imports numpy: build metadata with this interpreter's numpy, not an isolated env
    pip_args=("--no-build-isolation",),
)

SOURCES: Mapping[str, Sdist] = {"totalsegmentator": TOTALSEGMENTATOR, "pyradiomics": PYRADIOMICS}


# ---------------------------------------------------------------- fetch
def _log(msg: str) -> None:
    print(f"[sample_data] {msg}", flush=True)


def fetch_sdist(src: Sdist, root: Path) -> Path:
    """Download (once) and unpack the files of ``src`` under ``root/raw/<name>``; verify every sha256.

    Returns the folder that mirrors the archive's layout. Raises :class:`InputError` when the
    registry cannot be reached or a checksum differs.
    """
    raw = root / "raw" / src.name
    if raw.exists() and all(_sha_ok(raw / rel, sha) for rel, sha in src.files.items()):
        return raw
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / src.archive
    if not (archive.exists() and sha256_file(archive) == src.sha256):
        _log(f"downloading {src.name}=={src.version} (source distribution) with pip ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               "-d", str(downloads), *src.pip_args, f"{src.name}=={src.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not archive.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(archive, f"pip could not download {src.name}=={src.version} ({last})",
                             f"check the connection to PyPI, or copy {src.archive} into {downloads}")
    got = sha256_file(archive)
    if got != src.sha256:
        raise InputError(archive, f"sha256 mismatch (expected {src.sha256[:12]}..., got {got[:12]}...)",
                         "delete the file and run again; if it persists, the registry copy changed")
    _log(f"unpacking {len(src.files)} files from {archive.name}")
    tmp = Path(tempfile.mkdtemp(prefix=".raw-", dir=root))
    try:
        prefix = f"{src.name}-{src.version}/"
        with tarfile.open(archive) as tar:
            for rel in src.files:
                member = tar.getmember(prefix + rel)
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as f_in, open(dest, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
        for rel, sha in src.files.items():
            if not _sha_ok(tmp / rel, sha):
                raise InputError(tmp / rel, "sha256 mismatch after unpacking", f"delete {archive} and run again")
        if raw.exists():
            shutil.rmtree(raw)
        raw.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, raw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return raw


def _sha_ok(path: Path, sha: str) -> bool:
    return path.is_file() and sha256_file(path) == sha


# ---------------------------------------------------------------- building blocks
def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type = np.float32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder axes to the closest RAS orientation (same voxels, same physical space)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asanyarray(img.dataobj), img.affine


def _itk_loader() -> Any:
    """MONAI's ``LoadImage`` with the ITK reader, affine converted from LPS to RAS."""
    from monai.transforms import LoadImage

    from custom.transforms import without_nvimgcodec_notice

    with without_nvimgcodec_notice():
        return LoadImage(reader="ITKReader", image_only=True, affine_lps_to_ras=True)


def load_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series as (array in HU, NIfTI/RAS affine), read with MONAI's ITK reader."""
    img = _itk_loader()(str(folder))
    return np.asarray(img), np.asarray(img.affine, dtype=np.float64)


def dixon_from_ct(hu: np.ndarray) -> np.ndarray:
    """Four Dixon-like channels (fat, water, in-phase, opposed-phase) from a CT in HU.

    Two-compartment signal model: each voxel's fat fraction ``f`` rises linearly from 0 at +50 HU
    (soft tissue) to 1 at -100 HU (fat); proton density is 0 in air (< -500 HU) and 0.3 in dense
    bone (> 300 HU), else 1. Then F = rho f, W = rho (1 - f), IP = F + W, OP = |W - F| (the Dixon
    relations, no T1/T2* weighting). Output: float32 ``(4, *hu.shape)`` in [0, 1].
    """
    hu = hu.astype(np.float32)
    fat_fraction = np.clip((50.0 - hu) / 150.0, 0.0, 1.0)
    rho = np.where(hu < -500, 0.0, np.where(hu > 300, 0.3, 1.0)).astype(np.float32)
    fat, water = rho * fat_fraction, rho * (1.0 - fat_fraction)
    return np.stack([fat, water, fat + water, np.abs(water - fat)]).astype(np.float32)


@dataclass
class Case:
    """One sample case: name, image array (channel-last for multi-channel NIfTI) and optional label."""

    name: str
    image: np.ndarray
    affine: np.ndarray
    label: np.ndarray | None = None
    note: str = ""


def dataset_meta(name: str, description: str, licence: str, channels: Sequence[str], labels: Mapping[int, str]) -> dict:
    """The descriptive part of a Decathlon ``dataset.json``: channel names and label names keyed by str(index)."""
    return {"name": name, "description": description, "licence": licence,
            "modality": {str(i): c for i, c in enumerate(channels)}, "labels": {str(k): v for k, v in labels.items()}}


def write_dataset(
    folder: Path, cases: Mapping[str, list[Case]], meta: dict, readme: str, image_dtype: type = np.float32
) -> Path:
    """Write cases as NIfTI plus ``dataset.json`` (Decathlon style) into ``folder``, atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        datalist: dict = {**meta, "training": [], "validation": [], "test": []}
        for split, items in cases.items():
            for case in items:
                img_rel = f"images/{case.name}.nii.gz"
                _save(case.image, case.affine, tmp / img_rel, image_dtype)
                lab_rel = None
                if case.label is not None:
                    lab_rel = f"labels/{case.name}.nii.gz"
                    _save(case.label, case.affine, tmp / lab_rel, np.uint8)
                datalist.setdefault(split, []).append({"image": img_rel, **({"label": lab_rel} if lab_rel else {})})
        datalist["numTraining"] = len(datalist["training"])
        datalist["numTest"] = len(datalist["test"])
        (tmp / "dataset.json").write_text(json.dumps(datalist, indent=4) + "\n")
        (tmp / "README.md").write_text(readme)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------- datasets
def _ct_cases(raw: Path, mapping: Mapping[int, int], max_id: int) -> dict[str, Case]:
    ref = raw / _TS_REF
    ct, aff = _load(ref / "example_ct.nii.gz")
    seg, _ = _load(ref / "example_seg_fast_force_split.nii.gz")
    ct_sm, aff_sm = _load(ref / "example_ct_sm.nii.gz")
    seg_sm, _ = _load(ref / "example_seg.nii.gz")
    # the series reads as LPS-ordered, its label (dcm2niix) as LAS: same grid, y stored reversed
    dcm, aff_dcm = _canonical(*load_dicom_series(ref / "example_ct_dicom"))
    seg_dcm, aff_seg_dcm = _canonical(*_load(ref / "example_seg_dicom.nii.gz"))
    if not np.allclose(aff_dcm, aff_seg_dcm, atol=1e-3):
        raise InputError(ref / "example_seg_dicom.nii.gz", "label grid differs from the DICOM series", "report this")
    mr, aff_mr = _load(ref / "example_mr_sm.nii.gz")
    seg_mr, _ = _load(ref / "example_seg_mr.nii.gz")
    mr_map = L.TOTALSEG_MR_TO_BTCV if max_id == L.BTCV_NUM_CLASSES - 1 else L.TOTALSEG_MR_TO_UKBOB
    aorta, aff_aorta = _load(ref / "aorta_report" / "example_ct.nii.gz")
    return {
        "ct_abdomen": Case("ct_abdomen", ct, aff, L.remap_labels(seg, mapping)),
        "ct_abdomen_crop": Case("ct_abdomen_crop", ct_sm, aff_sm, L.remap_labels(seg_sm, mapping)),
        "ct_dicom": Case("ct_dicom", dcm, aff_dcm, L.remap_labels(seg_dcm, mapping)),
        "mr_abdomen": Case("mr_abdomen", mr, aff_mr, L.remap_labels(seg_mr, mr_map)),
        "ct_aorta": Case("ct_aorta", aorta, aff_aorta),
    }


_BTCV_README = """# btcv_sample: real CT relabelled to the 14 BTCV classes

Built by `python -m custom.sample_data` from TotalSegmentator 2.18.0 (Apache-2.0)
`tests/reference_files`. The labels are TotalSegmentator model predictions mapped to BTCV ids
(`custom.labels.TOTALSEG_TOTAL_TO_BTCV`), not manual ground truth. Esophagus is outside every
field of view.

| split | case | source | grid |
|---|---|---|---|
| training | ct_abdomen | example_ct + example_seg_fast_force_split | 122x101x112, 3 mm, RAS |
| training | ct_abdomen_crop | example_ct_sm + example_seg (30-slice crop of the same patient) | 122x101x30, 3 mm |
| validation | ct_dicom | example_ct_dicom series (another patient) + example_seg_dicom | 512x512x20, 0.98x0.98x2 mm |
| test | ct_dicom | the same series as a DICOM folder: `dicom/ct_dicom/` | |
| test | ct_aorta | aorta_report/example_ct (no labels) | 233x167x191, 1.5 mm |
| shift (`mr`) | mr_abdomen | example_mr_sm + example_seg_mr (`total_mr` ids mapped to BTCV) | 117x91x20, 3 mm, LPS |

`mr_abdomen` is listed under the extra key `mr` of `dataset.json`: a real MR with labels shared
with BTCV, for domain-shift tests (ETTA). Images are stored as float32 (HU for CT).

`dicom/ct_dicom/` is the source series with four UIDs filled in, because its anonymisation left them
empty and a PACS (Orthanc) refuses such files and a DICOM-SEG cannot reference them: `SOPClassUID` =
CT Image Storage (1.2.840.10008.5.1.4.1.1.2), `SOPInstanceUID` = the file meta's
`MediaStorageSOPInstanceUID` (the UID in the file name), `StudyInstanceUID` and `SeriesInstanceUID`
= pydicom's `generate_uid` (root 1.2.826.0.1.3680043.8.498.) from the series' own
`FrameOfReferenceUID` (`custom.sample_data.sample_series_uids`), so they are the same on every
machine. Pixel data (JPEG 2000 lossless, as shipped), geometry and every other element are the source's.
"""

_UKBOB_README = """# ukbob_sample: real anatomy, 73 UKBOB classes, four Dixon-like channels

Built by `python -m custom.sample_data` from TotalSegmentator 2.18.0 (Apache-2.0). UK Biobank
Dixon MRI cannot be downloaded here, so the four channels (fat, water, in-phase, opposed-phase)
are **derived from the real CTs** with a two-compartment Dixon signal model
(`custom.sample_data.dixon_from_ct`): fat fraction from Hounsfield units (0 at +50 HU, 1 at
-100 HU), proton density 0 in air and 0.3 in dense bone, then F = rho f, W = rho (1 - f),
IP = F + W, OP = |W - F|. The anatomy and the label maps are real; the contrasts are not real MRI
and carry no T1/T2* weighting, noise or bias field. Do not report results on it as MRI results.

Labels: TotalSegmentator `total` ids mapped to UKBOB ids (`custom.labels.TOTALSEG_TOTAL_TO_UKBOB`;
vertebrae and ribs have no UKBOB id and are background). They are automatic predictions: noisy,
the kind SOLF exists for.

| split | case | source |
|---|---|---|
| training | ct_abdomen, ct_abdomen_crop | example_ct (+ 30-slice crop) with example_seg_fast_force_split / example_seg |
| validation | ct_dicom | example_ct_dicom series with example_seg_dicom |
| test | ct_aorta | aorta_report/example_ct (no labels) |
"""


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def sample_series_uids(frame_of_reference_uid: str) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) of the sample series: pydicom's UID root plus a hash of
    the series' own FrameOfReferenceUID, so every machine derives the same two UIDs."""
    from pydicom.uid import generate_uid

    return (generate_uid(entropy_srcs=["swin_bob sample study", frame_of_reference_uid]),
            generate_uid(entropy_srcs=["swin_bob sample series", frame_of_reference_uid]))


def standard_dicom_series(src: Path, dst: Path) -> list[Path]:
    """Copy a CT series from ``src`` to ``dst`` with the UIDs its anonymisation emptied filled in.

    TotalSegmentator's ``example_ct_dicom`` has empty ``SOPClassUID``, ``SOPInstanceUID``,
    ``StudyInstanceUID`` and ``SeriesInstanceUID``: a PACS refuses such files and a DICOM-SEG cannot
    reference them. Each file gets CT Image Storage, its own file meta's ``MediaStorageSOPInstanceUID``
    (the UID its file name carries) as ``SOPInstanceUID``, and the study / series UIDs of
    :func:`sample_series_uids`. Every other element, the pixel data (still JPEG 2000 lossless) and the
    geometry stay as they are. Returns the written files, sorted.
    """
    import pydicom

    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        if meta.MediaStorageSOPClassUID != CT_IMAGE_STORAGE or not meta.MediaStorageSOPInstanceUID:
            raise InputError(path, "not a CT image with a SOP instance UID in its file meta", "report this")
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = sample_series_uids(ds.FrameOfReferenceUID)
        ds.save_as(dst / path.name, enforce_file_format=True)
        written.append(dst / path.name)
    return written


def build_btcv_sample(root: Path, raw: Path) -> Path:
    cases = _ct_cases(raw, L.TOTALSEG_TOTAL_TO_BTCV, L.BTCV_NUM_CLASSES - 1)
    folder = write_dataset(
        root / "btcv_sample",
        {
            "training": [cases["ct_abdomen"], cases["ct_abdomen_crop"]],
            "validation": [cases["ct_dicom"]],
            "test": [cases["ct_aorta"]],
            "mr": [cases["mr_abdomen"]],
        },
        dataset_meta(
            "btcv_sample",
            "Real CT (TotalSegmentator 2.18.0 reference files) relabelled to BTCV ids",
            "Apache-2.0 (TotalSegmentator)", ("CT",), L.BTCV_LABELS,
        ),
        _BTCV_README,
    )
    # the series as a folder too, for inference straight from DICOM, with the UIDs a PACS needs
    standard_dicom_series(raw / DICOM_DIR, folder / "dicom" / "ct_dicom")
    datalist = json.loads((folder / "dataset.json").read_text())
    datalist["test"].append({"image": "dicom/ct_dicom"})
    atomic_write_text(folder / "dataset.json", json.dumps(datalist, indent=4) + "\n")
    return folder


def build_ukbob_sample(root: Path, raw: Path) -> Path:
    cases = _ct_cases(raw, L.TOTALSEG_TOTAL_TO_UKBOB, L.UKBOB_NUM_CLASSES - 1)
    dixon = {}
    for name in ("ct_abdomen", "ct_abdomen_crop", "ct_dicom", "ct_aorta"):
        c = cases[name]
        # NIfTI stores vector images channel-last (x, y, z, c); LoadImage + EnsureChannelFirst restores (c, x, y, z)
        dixon[name] = Case(name, np.moveaxis(dixon_from_ct(c.image), 0, -1), c.affine, c.label)
    return write_dataset(
        root / "ukbob_sample",
        {
            "training": [dixon["ct_abdomen"], dixon["ct_abdomen_crop"]],
            "validation": [dixon["ct_dicom"]],
            "test": [dixon["ct_aorta"]],
        },
        dataset_meta(
            "ukbob_sample",
            "Real anatomy with UKBOB labels; Dixon-like channels derived from CT (not real MRI)",
            "Apache-2.0 (TotalSegmentator)", L.DIXON_CHANNELS, L.UKBOB_LABELS,
        ),
        _UKBOB_README,
    )


_BRATS_README = """# brats_sample: real brain MRI in the BraTS layout (4 channels, 2023 label ids)

Built by `python -m custom.sample_data` from pyradiomics 3.0.1 (BSD-3-Clause) `data/brain1_*`,
`data/brain2_*`: two real T1 post-contrast (T1c) brain MRIs, 256x256x25 / 23 voxels at
0.78x0.78x6.5 mm, each with a binary lesion mask. **Only T1c is real.** No real T1 / T2 / FLAIR
and no BraTS sub-region labels exist for these scans, so (`custom.sample_data.brats_from_t1c`):

- head mask `H`: T1c > 5% of its 99th percentile, largest connected component, holes filled;
  every channel is 0 outside `H` (the images are not skull-stripped, unlike BraTS);
- labels (BraTS 2023 ids): `ET` (3) = lesion voxels at or above the lesion's median T1c (the
  enhancing part), `NCR` (1) = the rest of the lesion, `ED` (2) = voxels of `H` outside the lesion
  within 7 mm of it (a physical-distance shell: in-plane rings plus the neighbouring slices);
- channel 0 `t1` = T1c clipped at the 75th percentile of `H` (enhancement clipped);
  channel 1 `t1c` = the real image; channel 2 `t2` = the inverted clipped T1c (`p99 - t1`, dark
  T1 voxels bright) with +50% of `p99` added in ED and the lesion; channel 3 `flair` = `t2` with
  the unlabelled voxels in the top 10% of the inverted T1c (fluid-like) scaled by 0.2, i.e. fluid
  suppressed while ED stays bright.

ED is bright in `t2`/`flair` by construction and ET is the bright part of the real lesion: the
sample is learnable, but it is not BraTS data. Do not report results on it as brain tumour results.

| split | case | source |
|---|---|---|
| training | brain1 | brain1_image.nrrd + brain1_label.nrrd (lesion 4137 voxels, 7 slices) |
| validation | brain2 | brain2_image.nrrd + brain2_label.nrrd (lesion 453 voxels, 3 slices) |
| test | brain2 | the same image, unlabelled, for inference |

Images: float32, 4 channels stored channel-last (x, y, z, c) on the scans' own grid (RAS), labels uint8.
"""


def brats_from_t1c(t1c: np.ndarray, lesion: np.ndarray, spacing: tuple[float, ...],
                   ed_mm: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """Four BraTS-like channels ``(4, *t1c.shape)`` and a 2023-id label map from a real T1c + lesion mask.

    See ``_BRATS_README`` (written beside the data) for the exact recipe; only ``t1c`` is real.
    """
    from scipy import ndimage

    t1c = t1c.astype(np.float32)
    lesion = lesion > 0
    head = t1c > 0.05 * np.percentile(t1c, 99)
    comps, n = ndimage.label(head)
    if n > 1:
        head = comps == (np.argmax(np.bincount(comps.ravel())[1:]) + 1)
    head = ndimage.binary_fill_holes(head) | lesion
    label = np.zeros(t1c.shape, np.uint8)
    if lesion.any():
        enhancing = lesion & (t1c >= np.median(t1c[lesion]))
        label[lesion] = 1
        label[enhancing] = 3
        dist = ndimage.distance_transform_edt(~lesion, sampling=spacing)
        label[(dist <= ed_mm) & ~lesion & head] = 2
    p75, p99 = np.percentile(t1c[head], [75, 99])
    t1 = np.minimum(t1c, p75)
    inverted = np.where(head, p99 - t1, 0.0)
    t2 = inverted + 0.5 * p99 * (label > 0)
    fluid = head & (label == 0) & (inverted >= np.percentile(inverted[head], 90))
    flair = np.where(fluid, 0.2 * t2, t2)
    image = np.stack([t1, t1c, t2, flair]) * head
    return image.astype(np.float32), label


def _load_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An NRRD/NIfTI file as (array, RAS affine), in the closest canonical (RAS) axis order."""
    img = _itk_loader()(str(path))
    return _canonical(np.asarray(img), np.asarray(img.affine, dtype=np.float64))


def build_brats_sample(root: Path, raw: Path) -> Path:
    cases = {}
    for name in ("brain1", "brain2"):
        t1c, affine = _load_itk(raw / "data" / f"{name}_image.nrrd")
        lesion, lab_affine = _load_itk(raw / "data" / f"{name}_label.nrrd")
        if lesion.shape != t1c.shape or not np.allclose(affine, lab_affine, atol=1e-3):
            raise InputError(raw / "data" / f"{name}_label.nrrd", "lesion mask grid differs from the image", "report this")
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        image, label = brats_from_t1c(t1c, lesion, spacing)
        cases[name] = Case(name, np.moveaxis(image, 0, -1), affine, label)
    folder = write_dataset(
        root / "brats_sample",
        {"training": [cases["brain1"]], "validation": [cases["brain2"]]},
        dataset_meta(
            "brats_sample",
            "Real T1c brain MRI (pyradiomics 3.0.1) with derived T1/T2/FLAIR and lesion sub-regions (not BraTS)",
            "BSD-3-Clause (pyradiomics)", L.BRATS_CONTRASTS, L.BRATS_LABELS,
        ),
        _BRATS_README,
    )
    datalist = json.loads((folder / "dataset.json").read_text())
    datalist["test"].append({"image": "images/brain2.nii.gz"})
    datalist["numTest"] = len(datalist["test"])
    atomic_write_text(folder / "dataset.json", json.dumps(datalist, indent=4) + "\n")
    return folder


#: dataset name -> (source sdist, builder). Other modules add theirs here (one registry).
DATASETS: dict[str, tuple[str, Callable[[Path, Path], Path]]] = {
    "btcv_sample": ("totalsegmentator", build_btcv_sample),
    "ukbob_sample": ("totalsegmentator", build_ukbob_sample),
    "brats_sample": ("pyradiomics", build_brats_sample),
}
_BUILD_VERSION = "1"
#: datasets whose content changed since version 1: a cache stamped with an older version is rebuilt
#: (btcv_sample 2: the DICOM series carries SOP class / instance, study and series UIDs)
_BUILD_VERSIONS: dict[str, str] = {"btcv_sample": "2"}


def prepare(name: str, root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Fetch the sources of dataset ``name`` and build it (once); return its folder."""
    if name not in DATASETS:
        raise InputError(None, f"unknown sample dataset {name!r}", f"choose one of {sorted(DATASETS)}")
    root = data_root(root)
    root = check_writable_dir(root)  # one line, exit 2, for a cache folder that cannot be created
    folder = root / name
    stamp = folder / ".built"
    version = _BUILD_VERSIONS.get(name, _BUILD_VERSION)
    if not force and stamp.exists() and stamp.read_text() == version:
        return folder
    source, builder = DATASETS[name]
    raw = fetch_sdist(SOURCES[source], root)
    _log(f"building {name} in {folder}")
    builder(root, raw)
    atomic_write_text(stamp, version)
    return folder


def prepare_all(root: str | os.PathLike | None = None, force: bool = False) -> dict[str, str]:
    """Build every sample dataset; returns name -> folder."""
    out = {name: str(prepare(name, root, force)) for name in DATASETS}
    for name, folder in out.items():
        _log(f"{name}: {folder}")
    return out


def main(root: str | None = None, force: bool = False, only: str | None = None) -> None:
    """``python -m custom.sample_data [--root DIR] [--force] [--only NAME]``."""
    if only:
        exit_on_input_error(prepare, only, root, force)
    else:
        exit_on_input_error(prepare_all, root, force)


def cli() -> None:
    """Console entry point and ``python -m``: :func:`main`'s arguments from the command line."""
    import fire  # only for the command line

    fire.Fire(main)


if __name__ == "__main__":
    cli()
