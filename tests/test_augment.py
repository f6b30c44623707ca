"""The CPU recipe's organ distension (custom.augment)."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from custom.augment import RandDistendOrgand, distend_organ

STOMACH, LIVER = 7, 6


def _scene() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4^3 stomach with a liver one voxel away along the first axis, in a 24^3 grid of intensity 0.2."""
    label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    label[0, 10:14, 10:14, 10:14] = STOMACH
    label[0, 15:20, 4:20, 4:20] = LIVER
    return torch.full((1, 24, 24, 24), 0.2), label


def _extent(mask: torch.Tensor, axis: int) -> int:
    idx = np.nonzero(np.asarray(mask[0]).any(axis=tuple(a for a in range(3) if a != axis)))[0]
    return int(idx[-1] - idx[0] + 1)


def test_distend_grows_into_background_only_and_paints_wall_and_lumen() -> None:
    image, label = _scene()
    out, grown = distend_organ(image, label, STOMACH, (2, 2, 2), wall=0.7, lumen=0.4)
    stomach = grown == STOMACH
    box = torch.zeros_like(stomach)
    box[0, 8:15, 8:16, 8:16] = True  # grown by 2 voxels per side, stopped by the liver at index 15
    assert torch.equal(stomach, box) and int(stomach.sum()) == 7 * 8 * 8
    assert torch.equal(grown == LIVER, label == LIVER)  # never grown into another organ
    assert torch.equal(out[~stomach], image[~stomach])  # nothing outside the organ changes
    lumen = torch.zeros_like(stomach)
    lumen[0, 9:14, 9:15, 9:15] = True  # the box less its one-voxel outer layer
    assert torch.all(out[lumen] == 0.4) and torch.all(out[stomach & ~lumen] == 0.7)
    assert int((out == 0.7).sum()) == 7 * 8 * 8 - 5 * 6 * 6
    assert image.max() == 0.2 and int((label == STOMACH).sum()) == 64  # inputs untouched
    again, same = distend_organ(image, torch.zeros_like(label), STOMACH, (2, 2, 2), 0.7, 0.4)
    assert again is image and torch.equal(same, torch.zeros_like(label))  # no stomach: nothing to do


def test_random_distension_is_isotropic_in_mm_and_keeps_metadata() -> None:
    image, label = _scene()
    affine = np.diag([6.0, 6.0, 3.0, 1.0])
    data = {"image": MetaTensor(image, affine=affine), "label": MetaTensor(label, affine=affine)}
    t = RandDistendOrgand("image", organs=[STOMACH], prob=1.0, radius=(2, 2), wall=(0.7, 0.7), lumen=(0.4, 0.4), noise_std=0.0)
    out = t(data)
    stomach = out["label"] == STOMACH
    # 2 voxels of 6 mm in-plane, 4 of 3 mm through-plane: 12 mm each way (axis 0 is stopped by the liver)
    assert (_extent(stomach, 0), _extent(stomach, 1), _extent(stomach, 2)) == (7, 8, 12)
    assert isinstance(out["image"], MetaTensor) and np.allclose(out["image"].affine, affine)
    assert isinstance(out["label"], MetaTensor) and np.allclose(out["label"].pixdim, [6.0, 6.0, 3.0])
    never = RandDistendOrgand("image", organs=[STOMACH], prob=0.0)(data)
    assert torch.equal(never["image"], data["image"]) and torch.equal(never["label"], data["label"])
