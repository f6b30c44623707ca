import json

import numpy as np
import pytest

from custom import labels as L


def test_ukbob_taxonomy_has_73_classes_with_unused_slot():
    assert L.UKBOB_NUM_CLASSES == 73
    assert list(L.UKBOB_LABELS) == list(range(73))
    assert L.UKBOB_LABELS[20] == "unused"
    assert (L.UKBOB_LABELS[24], L.UKBOB_LABELS[62], L.UKBOB_LABELS[72]) == ("heart", "iliopsoas_right", "bone_other")


def test_lr_pairs_are_left_then_right_and_disjoint():
    ids = [i for pair in L.UKBOB_LR_PAIRS for i in pair]
    assert len(ids) == len(set(ids)) == 34
    for left, right in L.UKBOB_LR_PAIRS:
        assert L.UKBOB_LABELS[left].endswith("left") and L.UKBOB_LABELS[right].endswith("right")
        assert L.UKBOB_LABELS[left].removesuffix("left") == L.UKBOB_LABELS[right].removesuffix("right")
    assert not L.UKBOB_LUNG_LOBE_IDS & set(ids)


def test_totalsegmentator_total_map_follows_spec():
    m = L.TOTALSEG_TOTAL_TO_UKBOB
    assert m[51] == L.UKBOB_ID["heart"] == 24 and m[89] == 62 and m[25] == 23
    assert m[18] == m[20] == L.UKBOB_ID["intestine"]
    assert m[116] == 63 and m[117] == 64
    for no_id in (23, 24, 26, 50, 90, 91, 92, 115):  # kidney cysts, vertebrae, brain, skull, ribs
        assert no_id not in m


def test_totalsegmentator_mr_maps_by_name():
    m = L.TOTALSEG_MR_TO_UKBOB
    for mr_id, ukbob_id in m.items():
        mr_name, ukbob_name = L.TOTALSEG_MR_LABELS[mr_id], L.UKBOB_LABELS[ukbob_id]
        assert mr_name == ukbob_name or (mr_name, ukbob_name) in {
            ("small_bowel", "intestine"), ("colon", "intestine"), ("intervertebral_discs", "IVD")}
    assert 10 not in m and 11 not in m  # whole lungs: no lobe id


def test_btcv_map_names_agree():
    for ukbob_id, btcv_id in L.UKBOB_TO_BTCV.items():
        assert L.UKBOB_LABELS[ukbob_id] == L.BTCV_LABELS[btcv_id]
    assert sorted(L.UKBOB_TO_BTCV.values()) == list(range(1, 14))
    assert L.TOTALSEG_TOTAL_TO_BTCV[52] == 8 and L.TOTALSEG_TOTAL_TO_BTCV[63] == 9  # aorta, IVC


def test_remap_labels_on_array():
    seg = np.array([[0, 52, 5], [63, 117, 200]], dtype=np.uint8)
    out = L.remap_labels(seg, L.TOTALSEG_TOTAL_TO_BTCV)
    assert out.tolist() == [[0, 8, 6], [9, 0, 0]] and out.dtype == np.uint8


def test_component_ranges():
    assert L.expected_components(5) == L.ComponentRange(1, 1, True)  # liver
    assert not L.expected_components(25).reduce  # aorta: vessels never reduced
    assert L.expected_components(64).max_count == 30
    assert 20 not in L.UKBOB_COMPONENT_RANGES and len(L.UKBOB_COMPONENT_RANGES) == 71


@pytest.mark.parametrize("bundle", sorted(L.BUNDLE_TAXONOMY))
def test_bundle_channel_def_agrees_with_labels(repo_root, bundle):
    meta_file = repo_root / "bundles" / bundle / "configs" / "metadata.json"
    assert L.sync_metadata(repo_root / "bundles", check=True) == []
    meta = json.loads(meta_file.read_text())
    out_def = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
    assert len(out_def) == len(L.TAXONOMIES[L.BUNDLE_TAXONOMY[bundle]].output_channels)
