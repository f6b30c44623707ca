"""custom.dicom_seg: DICOM-SEG of the real sample CT series, checked by dciodvfy, highdicom and voxel by voxel.

The label map is the sample's real TotalSegmentator labels of that series mapped to BTCV ids
(``btcv_sample/labels/ct_dicom.nii.gz``, stored in RAS order, so the writer must follow the affine).
``dciodvfy`` comes from Debian's ``dicom3tools`` (``make test-label`` installs it); without it that
one assertion is skipped.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from custom import dicom_seg as D
from custom import labels as L
from custom import sample_data as S
from custom.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def series(btcv_sample: Path) -> Path:
    return btcv_sample / "dicom" / "ct_dicom"


@pytest.fixture(scope="module")
def nifti(btcv_sample: Path) -> Path:
    return btcv_sample / "labels" / "ct_dicom.nii.gz"


@pytest.fixture(scope="module")
def seg_file(series: Path, nifti: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dicom_seg") / "ct_dicom_seg.dcm"
    return D.nifti_to_dicom_seg(nifti, series, out, L.BTCV_LABELS, algorithm="swin_bob_btcv", version="0.1.0")


def test_dciodvfy_reports_no_error(seg_file: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed; `make test-label` installs it")
    proc = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    assert "Segmentation" in report  # it recognised the IOD
    assert [line for line in report.splitlines() if line.startswith("Error")] == []


def test_segments_equal_the_label_map(seg_file: Path, series: Path, nifti: Path) -> None:
    import highdicom as hd

    seg = hd.seg.segread(seg_file)
    label_img = nib.load(nifti)
    label = np.asarray(label_img.dataobj)
    present = [int(i) for i in np.unique(label) if i]
    assert len(present) >= 8  # spleen, kidneys, liver, stomach, aorta, IVC, ... of the real series
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [L.BTCV_LABELS[i] for i in present]

    # every segment, as highdicom places it in the patient frame, against the NIfTI voxels of that organ
    volume = seg.get_volume(combine_segments=True, relabel=False)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    to_label = np.linalg.inv(label_img.affine) @ lps_to_ras @ volume.affine  # SEG voxel -> NIfTI voxel
    idx = np.indices(volume.spatial_shape).reshape(3, -1)
    target = to_label[:3, :3] @ idx + to_label[:3, 3:]
    assert np.abs(target - np.rint(target)).max() < 1e-3  # the same grid
    i, j, k = np.rint(target).astype(int)
    expected = np.zeros(label.max() + 1, int)
    expected[present] = np.arange(1, len(present) + 1)  # organ id -> segment number
    assert np.array_equal(volume.array.reshape(-1), expected[label[i, j, k]])
    # and nothing of the label map lies outside the frames the SEG kept
    for organ_id, number in zip(present, seg.segment_numbers):
        assert int((volume.array == number).sum()) == int((label == organ_id).sum())


def test_references_and_codes(seg_file: Path, series: Path) -> None:
    seg = pydicom.dcmread(seg_file)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir())]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {s.SOPInstanceUID for s in sources}
    per_frame = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                 for f in seg.PerFrameFunctionalGroupsSequence}
    assert per_frame <= {s.SOPInstanceUID for s in sources}
    by_name = {s.SegmentLabel: s for s in seg.SegmentSequence}
    adrenal = by_name["adrenal_gland_right"].SegmentedPropertyTypeCodeSequence[0]
    assert (adrenal.CodingSchemeDesignator, adrenal.CodeValue, adrenal.CodeMeaning) == ("SCT", "23451007", "Adrenal gland")
    assert adrenal.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"  # right
    liver = by_name["liver"]
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert tuple(liver.RecommendedDisplayCIELabValue) != tuple(by_name["spleen"].RecommendedDisplayCIELabValue)
    assert liver.SegmentAlgorithmName == "swin_bob_btcv"


def test_codes_match_totalsegmentator_table() -> None:
    # the facts in custom.labels against the CSV inside the sdist the sample data comes from
    archive = S.data_root() / "downloads" / S.TOTALSEGMENTATOR.archive
    member = f"totalsegmentator-{S.TOTALSEGMENTATOR.version}/totalsegmentator/resources/totalsegmentator_snomed_mapping.csv"
    with tarfile.open(archive) as tar:
        rows = {r["Structure"]: r for r in csv.DictReader(io.TextIOWrapper(tar.extractfile(member), "utf-8"))}
    checked = 0
    for name, code in L.SEGMENT_CODES.items():
        if code.type[0] != "SCT":
            assert code.type[0] == L.PROJECT_CODING_SCHEME and rows.get(name) is None
            continue
        row = rows[L.SEGMENT_CODE_ALIASES.get(name, name)]
        assert code.category[1:] == (row["SegmentedPropertyCategoryCodeSequence.CodeValue"],
                                     row["SegmentedPropertyCategoryCodeSequence.CodeMeaning"])
        assert code.type[1] == row["SegmentedPropertyTypeCodeSequence.CodeValue"]
        assert (code.modifier[1] if code.modifier else "") == row["SegmentedPropertyTypeModifierCodeSequence.CodeValue"]
        assert (code.region[1] if code.region else "") == row["AnatomicRegionSequence.CodeValue"]
        assert ",".join(map(str, code.rgb)) == row["DicomRGBColor"]
        checked += 1
    assert checked == 66
    structures = {n for i, n in L.UKBOB_LABELS.items() if i and i not in L.UKBOB_UNUSED_IDS}
    structures |= {n for i, n in L.BTCV_LABELS.items() if i} | {n for i, n in L.BRATS_LABELS.items() if i}
    assert structures <= set(L.SEGMENT_CODES)


def test_transform_on_a_metatensor(series: Path, nifti: Path, tmp_path: Path) -> None:
    from monai.data import MetaTensor
    from monai.transforms import Compose

    img = nib.load(nifti)
    pred = MetaTensor(np.asarray(img.dataobj)[None], affine=img.affine, meta={"filename_or_obj": str(series)})
    out = Compose([D.SaveDicomSegd("pred", tmp_path, L.BTCV_LABELS)])({"pred": pred})
    assert out["pred_dicom_seg"] == str(tmp_path / "ct_dicom_seg.dcm")
    assert pydicom.dcmread(out["pred_dicom_seg"]).Modality == "SEG"


def test_bad_inputs_are_one_line(series: Path, nifti: Path, btcv_sample: Path, tmp_path: Path) -> None:
    img = nib.load(nifti)
    label = np.asarray(img.dataobj)
    with pytest.raises(InputError, match="needs a DICOM series folder"):
        D.check_request(btcv_sample / "images" / "ct_dicom.nii.gz", tmp_path / "x.dcm")
    with pytest.raises(InputError, match="must be a .dcm"):
        D.check_request(series, tmp_path / "x.nii.gz")
    shifted = img.affine.copy()
    shifted[:3, 3] += 0.4  # 0.4 mm: not on the series grid any more
    with pytest.raises(InputError, match="not on the DICOM series' grid"):
        D.write_dicom_seg(label, shifted, series, tmp_path / "x.dcm", L.BTCV_LABELS)
    with pytest.raises(InputError, match="no structure"):
        D.write_dicom_seg(np.zeros_like(label), img.affine, series, tmp_path / "x.dcm", L.BTCV_LABELS)
    anonymous = tmp_path / "anonymous"
    shutil.copytree(S.data_root() / "raw" / "totalsegmentator" / S.DICOM_DIR, anonymous)  # the sdist's empty UIDs
    with pytest.raises(InputError, match="without SOPClassUID"):
        D.write_dicom_seg(label, img.affine, anonymous, tmp_path / "x.dcm", L.BTCV_LABELS)
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.slow
def test_segment_cli_writes_dicom_seg(series: Path, btcv_sample: Path, tmp_path: Path) -> None:
    import torch
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    torch.save({"model": SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict()}, model)
    tiny = ["feature_size=12", "roi_size=[64,64,64]", "pixdim=[6,6,6]", "sw_batch_size=1", "num_workers=0"]
    out = tmp_path / "out" / "seg.dcm"
    base = [sys.executable, "-m", "custom.segment", "--device", "cpu", "--model", str(model), "--output_type", "dicom_seg"]
    proc = subprocess.run([*base, "-i", str(series), "-o", str(out), "--override", *tiny],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seg = pydicom.dcmread(out)
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(
        next(series.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "swin_bob_btcv"
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.dcm"]  # no temporary NIfTI left
    # a NIfTI input asked for DICOM-SEG: one line, exit 2, nothing written
    bad = subprocess.run([*base, "-i", str(btcv_sample / "images" / "ct_dicom.nii.gz"), "-o", str(tmp_path / "b.dcm")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "needs a DICOM series folder" in bad.stderr and not (tmp_path / "b.dcm").exists()


@pytest.mark.slow
def test_bundle_inference_output_type_dicom_seg(series: Path, tmp_path: Path) -> None:
    import torch
    from monai.bundle import run
    from monai.networks.nets import SwinUNETR

    bundle = REPO / "bundles" / "swin_bob_btcv"
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save({"model": SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict()},
               tmp_path / "models" / "model.pt")
    run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), input_path=str(series),
        output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"), output_type="dicom_seg",
        device="$torch.device('cpu')", feature_size=12, roi_size=[64, 64, 64], pixdim=[6, 6, 6], sw_batch_size=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct_dicom_seg.dcm"]  # no NIfTI beside it
    seg = pydicom.dcmread(tmp_path / "out" / "ct_dicom_seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentAlgorithmName == "swin_bob_btcv"
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "0.1.0"  # metadata.json
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(
        next(series.iterdir()), stop_before_pixels=True).SeriesInstanceUID
