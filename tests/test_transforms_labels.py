"""``custom.transforms`` for label maps: ``LogitsToLabels(d)`` and ``InvertLabelsd`` (model grid -> input grid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, Orientationd, Spacingd

from custom.transforms import InvertLabelsd, LogitsToLabels, LogitsToLabelsd, labels_to_input_grid

REPO = Path(__file__).resolve().parents[1]


def test_logits_to_labels():
    scores = torch.tensor([[[[0.2]]], [[[1.5]]], [[[-3.0]]]])  # (3, 1, 1, 1)
    assert LogitsToLabels("softmax")(scores).flatten().tolist() == [1]
    assert LogitsToLabels("sigmoid")(scores).flatten().tolist() == [1, 1, 0]
    already = torch.full((1, 2, 2, 2), 7, dtype=torch.uint8)
    assert LogitsToLabelsd("pred")({"pred": already})["pred"] is already  # the streaming inferer's labels pass through
    with pytest.raises(ValueError, match="softmax"):
        LogitsToLabels("relu")


@pytest.mark.parametrize("case", ["dicom/ct_dicom", "images/ct_abdomen.nii.gz"])
def test_invert_labels_equals_monai_invertd_on_real_organs(btcv_sample, case):
    """The sample's real organ labels, taken to the BTCV model grid and back: as MONAI's nearest Invertd."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "swin_bob_btcv" / "configs" / "inference.json"))
    parser.update({"bundle_root": str(REPO / "bundles" / "swin_bob_btcv")})
    pre = parser.get_parsed_content("preprocessing")
    image = pre({"image": str(btcv_sample / case)})["image"]
    label_file = btcv_sample / "labels" / (Path(case).name.removesuffix(".nii.gz") + ".nii.gz")
    on_model_grid = Compose([LoadImaged("label", ensure_channel_first=True), Orientationd("label", axcodes="RAS"),
                             Spacingd("label", pixdim=parser["pixdim"], mode="nearest")])({"label": str(label_file)})["label"]
    pred = MetaTensor(on_model_grid.as_tensor().to(torch.uint8)).copy_meta_from(image, copy_attr=False)
    ours = InvertLabelsd("pred", transform=pre)({"image": image, "pred": pred})["pred"]
    monai = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)({"image": image, "pred": pred.clone()})["pred"]
    assert ours.shape == monai.shape and torch.allclose(ours.affine.double(), monai.affine.double(), atol=1e-4)
    same = (ours.to(torch.uint8) == monai.to(torch.uint8)).float().mean().item()
    assert same > 0.9999, same  # only voxel centres exactly halfway between two model voxels may differ
    assert ours.dtype == torch.uint8


def test_rotated_grids_are_left_to_invertd():
    rotation = torch.eye(4, dtype=torch.float64)
    rotation[:2, :2] = torch.tensor([[0.8, -0.6], [0.6, 0.8]])
    assert labels_to_input_grid(torch.zeros(1, 4, 4, 4, dtype=torch.uint8), torch.eye(4), rotation, (4, 4, 4)) is None


def test_axis_permutation_and_flip_by_indexing():
    labels = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(1, 2, 3, 4)
    model = torch.eye(4, dtype=torch.float64)
    swap = torch.tensor([[0, 1, 0, 0], [-1, 0, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)  # input x -> model -y
    out = labels_to_input_grid(labels, model, swap, (3, 2, 4))
    # input voxel (i, j, k) sits at world (j, 2 - i, k): the model voxel with those indices
    for i in range(3):
        for j in range(2):
            assert torch.equal(out[0, i, j], labels[0, j, 2 - i])
