"""Statistics in TotalSegmentator's format: compared with TotalSegmentator's own ``get_basic_statistics``.

Its ``statistics.py`` and ``map_to_binary.py`` are read from the 2.18.0 sdist the sample data comes
from (checksummed by ``custom.sample_data``) and imported from a temporary folder, without installing
TotalSegmentator; they import only numpy, nibabel and tqdm.
"""

from __future__ import annotations

import importlib
import json
import sys
import tarfile

import nibabel as nib
import numpy as np
import pytest

from custom.labels import BTCV_LABELS, TOTALSEG_TOTAL_TO_BTCV, remap_labels
from custom.statistics import border_ids, organ_statistics, write_statistics


@pytest.fixture(scope="module")
def ts(tmp_path_factory):
    """TotalSegmentator's ``statistics`` module and the raw sample folder."""
    from custom.sample_data import TOTALSEGMENTATOR, data_root, fetch_sdist

    raw = fetch_sdist(TOTALSEGMENTATOR, data_root())
    folder = tmp_path_factory.mktemp("ts_sdist")
    (folder / "totalsegmentator").mkdir()
    (folder / "totalsegmentator" / "__init__.py").write_text("")  # the package's own __init__ is not needed
    prefix = f"totalsegmentator-{TOTALSEGMENTATOR.version}/totalsegmentator/"
    with tarfile.open(data_root() / "downloads" / TOTALSEGMENTATOR.archive) as tar:
        for name in ("statistics.py", "map_to_binary.py"):
            with tar.extractfile(prefix + name) as f:
                (folder / "totalsegmentator" / name).write_bytes(f.read())
    sys.path.insert(0, str(folder))
    try:
        stats = importlib.import_module("totalsegmentator.statistics")
        yield stats, raw / "tests" / "reference_files"
    finally:
        sys.path.remove(str(folder))
        for mod in [m for m in sys.modules if m == "totalsegmentator" or m.startswith("totalsegmentator.")]:
            del sys.modules[mod]


def _same(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)  # every class, in the taxonomy's order
    for organ, ref in theirs.items():
        assert set(ref) <= set(ours[organ])
        assert ours[organ]["volume"] == pytest.approx(float(ref["volume"]), rel=1e-6, abs=0), organ  # mm^3
        assert ours[organ]["intensity"] == pytest.approx(float(ref["intensity"]), abs=1e-9), organ


@pytest.mark.parametrize("seg, ct", [("example_seg_fast_force_split.nii.gz", "example_ct.nii.gz"), ("example_seg.nii.gz", "example_ct_sm.nii.gz")])
def test_equals_totalsegmentator_on_its_own_labels(ts, seg, ct) -> None:
    stats, ref_dir = ts
    seg_img, ct_img = nib.load(str(ref_dir / seg)), nib.load(str(ref_dir / ct))
    labels = np.asarray(seg_img.dataobj)
    theirs = stats.get_basic_statistics(labels, ct_img, quiet=True, task="total")
    ours = organ_statistics(labels, np.asarray(ct_img.dataobj), ct_img.affine, stats.class_map["total"])
    _same(ours, theirs)
    measured = [o for o, v in theirs.items() if v["volume"] > 0]
    assert len(measured) >= 4  # the comparison covers real organs, not only zeros
    # the border rule: every organ TotalSegmentator zeroes while present is flagged partial here, with its real volume
    for organ, v in ours.items():
        if v["partial"]:
            assert theirs[organ]["volume"] == 0.0 and v["voxels"] > 0 and v["volume_ml"] == pytest.approx(v["voxels"] * 0.027, rel=1e-4)
        elif v["voxels"]:
            assert theirs[organ]["volume"] == pytest.approx(v["volume_ml"] * 1000, rel=1e-4)
    with_border = stats.get_basic_statistics(labels, ct_img, quiet=True, exclude_masks_at_border=False)
    _same(organ_statistics(labels, np.asarray(ct_img.dataobj), ct_img.affine, stats.class_map["total"], exclude_masks_at_border=False), with_border)


def test_equals_totalsegmentator_on_btcv_ids_and_writes_its_json(ts, tmp_path) -> None:
    """Our own taxonomy through TotalSegmentator's function (its class map given our names)."""
    stats, ref_dir = ts
    seg_img, ct_img = nib.load(str(ref_dir / "example_seg_fast_force_split.nii.gz")), nib.load(str(ref_dir / "example_ct.nii.gz"))
    labels = remap_labels(np.asarray(seg_img.dataobj), TOTALSEG_TOTAL_TO_BTCV)
    names = {i: n for i, n in BTCV_LABELS.items() if i}
    stats.class_map["btcv_test"] = names
    theirs = stats.get_basic_statistics(labels, ct_img, quiet=True, task="btcv_test", file_out=tmp_path / "ts.json")
    qc = {"organs": {"liver": {"label_id": 6, "verdict": "partial"}, "spleen": {"label_id": 1, "verdict": "ok"}}}
    ours = organ_statistics(labels, np.asarray(ct_img.dataobj), ct_img.affine, BTCV_LABELS, qc=qc)
    _same(ours, theirs)
    assert ours["spleen"]["qc"] == "ok" and ours["liver"]["qc"] == "partial" and ours["aorta"]["qc"] is None
    assert ours["esophagus"] == {"volume": 0.0, "intensity": 0.0, "volume_ml": 0.0, "voxels": 0, "partial": False, "qc": None}
    write_statistics(tmp_path / "ours.json", ours)
    back = json.loads((tmp_path / "ours.json").read_text())
    ts_file = json.loads((tmp_path / "ts.json").read_text())
    assert list(back) == list(ts_file) and all(set(ts_file[k]) <= set(back[k]) for k in ts_file)


def test_multichannel_intensity_and_border_ids() -> None:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[4:6, 4:6, 4:6] = 1  # inside
    labels[0, 5, 5] = 2  # on the border
    labels[7, 5, 5] = 3  # 2 voxels from the last x slice: within 3
    image = np.stack([np.full((10, 10, 10), 10.0), np.arange(1000, dtype=float).reshape(10, 10, 10)])
    assert border_ids(labels) == {2, 3}
    out = organ_statistics(labels, image, np.diag([2.0, 2.0, 2.0, 1.0]), {1: "a", 2: "b", 3: "c", 4: "d"})
    assert out["a"]["volume"] == 64.0 and out["a"]["voxels"] == 8 and out["a"]["volume_ml"] == 0.064
    assert out["a"]["intensity"] == 10.0 and out["a"]["intensity_channels"] == [10.0, 499.5]
    assert out["b"]["volume"] == 0.0 and out["b"]["partial"] and out["b"]["volume_ml"] == 0.008
    assert out["d"]["voxels"] == 0 and not out["d"]["partial"]
