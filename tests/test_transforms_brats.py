"""BraTS 2023 label map <-> TC/WT/ET channels (custom.transforms), both ways, all array types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom.errors import InputError
from custom.labels import BRATS_REGIONS
from custom.transforms import (
    BRATS_PAINT_ORDER,
    BratsLabelToRegions,
    BratsLabelToRegionsd,
    BratsRegionsToLabel,
    BratsRegionsToLabeld,
)


def label_map() -> np.ndarray:
    """4x3x2 map with every id: row 0 background, 1 NCR, 2 ED, 3 ET."""
    lab = np.zeros((1, 4, 3, 2), dtype=np.uint8)
    for i in range(4):
        lab[0, i] = i
    return lab


def test_regions_of_each_2023_id():
    regions = BratsLabelToRegions()(label_map())
    assert regions.shape == (3, 4, 3, 2) and regions.dtype == np.float32
    names = [name for name, _ in BRATS_REGIONS]
    assert names == ["TC", "WT", "ET"]
    # voxel of id i -> (TC, WT, ET)
    expected = {0: (0, 0, 0), 1: (1, 1, 0), 2: (0, 1, 0), 3: (1, 1, 1)}
    for idx, want in expected.items():
        assert tuple(regions[:, idx, 0, 0]) == want, idx
    assert regions.sum() == 3 * 6 + 6 + 2 * 6  # TC 12, WT 18, ET 6 voxels


def test_round_trip_numpy_tensor_metatensor():
    lab = label_map()
    back = BratsRegionsToLabel()(BratsLabelToRegions()(lab))
    assert np.array_equal(back, lab)
    t = torch.as_tensor(lab)
    assert torch.equal(BratsRegionsToLabel()(BratsLabelToRegions()(t)), t)
    meta = MetaTensor(t, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])), meta={"filename_or_obj": "case.nii.gz"})
    regions = BratsLabelToRegions()(meta)
    assert isinstance(regions, MetaTensor) and torch.equal(regions.affine, meta.affine)
    back = BratsRegionsToLabel()(regions)
    assert isinstance(back, MetaTensor) and back.meta["filename_or_obj"] == "case.nii.gz"
    assert torch.equal(back.as_tensor().long(), t.long())


def test_paint_order_and_non_nested_predictions():
    assert BRATS_PAINT_ORDER == ((1, 2), (0, 1), (2, 3))  # WT adds ED 2, TC adds NCR 1, ET adds ET 3
    regions = torch.zeros(3, 5, 1, 1)
    regions[:, 0] = torch.tensor([0, 0, 0])[:, None, None]
    regions[:, 1] = torch.tensor([0, 1, 0])[:, None, None]  # WT only -> ED
    regions[:, 2] = torch.tensor([1, 1, 0])[:, None, None]  # TC -> NCR
    regions[:, 3] = torch.tensor([1, 1, 1])[:, None, None]  # ET -> 3, never the 2021 id 4
    regions[:, 4] = torch.tensor([0, 0, 1])[:, None, None]  # ET outside TC/WT (not nested) -> still ET
    assert BratsRegionsToLabel()(regions).flatten().tolist() == [0, 2, 1, 3, 3]
    probs = torch.full((3, 2, 1, 1), 0.4)  # below 0.5: background
    assert BratsRegionsToLabel()(probs).sum() == 0


def test_dictionary_versions():
    d = {"label": label_map(), "image": np.ones((4, 4, 3, 2), np.float32)}
    out = BratsLabelToRegionsd("label")(d)
    assert out["label"].shape == (3, 4, 3, 2) and out["image"] is d["image"]
    back = BratsRegionsToLabeld("label")(out)
    assert np.array_equal(back["label"], label_map())


def test_2021_id_4_and_wrong_shapes_are_refused():
    lab = label_map()
    lab[0, 3] = 4  # a BraTS 2021 ET voxel
    meta = MetaTensor(torch.as_tensor(lab), meta={"filename_or_obj": "brats21_seg.nii.gz"})
    with pytest.raises(InputError, match=r"brats21_seg\.nii\.gz: label id\(s\) \[4\] are not BraTS 2023 ids .* map 4 -> 3"):
        BratsLabelToRegions()(meta)
    with pytest.raises(ValueError, match="channel-first label map"):
        BratsLabelToRegions()(np.zeros((4, 3, 2)))
    with pytest.raises(ValueError, match="3 region channels"):
        BratsRegionsToLabel()(np.zeros((2, 4, 3, 2)))
