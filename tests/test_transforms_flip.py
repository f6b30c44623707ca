"""Left-right flip that swaps paired labels (custom.transforms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom.labels import IGNORE_LABEL, UKBOB_ID, UKBOB_LR_PAIRS
from custom.transforms import FlipSwapLR, RandFlipSwapLRd

KL, KR, LIVER, LUNG = UKBOB_ID["kidney_left"], UKBOB_ID["kidney_right"], UKBOB_ID["liver"], UKBOB_ID["lung_upper_lobe_left"]


def body(lung: bool = False) -> np.ndarray:
    """(1, 8, 3, 3): left kidney at x=0 (RAS: x grows to the left), right kidney at x=7, liver at x=6."""
    lab = np.zeros((1, 8, 3, 3), np.uint8)
    lab[0, 0], lab[0, 7], lab[0, 6] = KL, KR, LIVER
    if lung:
        lab[0, 1] = LUNG
    return lab


def test_flip_swaps_every_pair_and_is_an_involution() -> None:
    out = FlipSwapLR()(body())
    assert out[0, :, 0, 0].tolist() == [KL, LIVER, 0, 0, 0, 0, 0, KR]  # kidneys back on their own side
    assert (FlipSwapLR()(out) == body()).all()
    ids = np.array([i for pair in UKBOB_LR_PAIRS for i in pair], np.uint8).reshape(1, -1, 1, 1)
    swapped = FlipSwapLR(spatial_axis=1)(ids)  # flip an axis of size 1: only the relabelling acts
    assert swapped.flatten().tolist() == [i for left, right in UKBOB_LR_PAIRS for i in (right, left)]


def test_metatensor_keeps_metadata_and_records_the_flip() -> None:
    lab = MetaTensor(torch.tensor(body()).float(), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = FlipSwapLR()(lab)
    assert isinstance(out, MetaTensor) and out.affine[0, 0] == -2.0 and out.affine[2, 2] == 3.0  # MONAI's Flip updates the affine
    assert out.applied_operations[-1]["class"] == "Flip"


def test_lungs_are_never_mislabelled() -> None:
    with pytest.raises(ValueError, match="lung"):
        FlipSwapLR()(body(lung=True))
    img = torch.arange(8.0).reshape(1, 8, 1, 1).expand(1, 8, 3, 3).clone()
    skipped = RandFlipSwapLRd(["image", "label"], prob=1.0)({"image": img, "label": torch.tensor(body(lung=True))})
    assert skipped["label"][0, :, 0, 0].tolist() == body(lung=True)[0, :, 0, 0].tolist()
    assert skipped["image"][0, 0, 0, 0] == 0.0  # image not flipped either: the pair stays aligned
    ignored = RandFlipSwapLRd(["image", "label"], prob=1.0, lung_policy="ignore")({"image": img, "label": torch.tensor(body(lung=True))})
    assert ignored["label"][0, :, 0, 0].tolist() == [KL, LIVER, 0, 0, 0, 0, IGNORE_LABEL, KR]
    assert ignored["image"][0, :, 0, 0].tolist() == list(range(7, -1, -1))


def test_random_flip_is_seeded_and_flips_image_with_label() -> None:
    t = RandFlipSwapLRd(["image", "label"], prob=0.5).set_random_state(0)
    img = torch.arange(8.0).reshape(1, 8, 1, 1)
    flips = 0
    for _ in range(40):
        d = t({"image": img, "label": torch.tensor(body()[:, :, :1, :1])})
        flipped = d["image"][0, 0, 0, 0].item() == 7.0
        flips += flipped
        assert d["label"][0, 0, 0, 0].item() == KL  # left kidney always ends up on the left
    assert 10 < flips < 30
