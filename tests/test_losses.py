"""MaskedDiceCELoss: equal to MONAI's DiceCELoss without ignored voxels; ignored voxels get zero gradient."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from custom.labels import IGNORE_LABEL, UKBOB_NUM_CLASSES
from custom.losses import MaskedDiceCELoss


def test_matches_monai_dicece_when_nothing_is_ignored() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, UKBOB_NUM_CLASSES, 8, 8, 8)
    target = torch.randint(0, UKBOB_NUM_CLASSES, (2, 1, 8, 8, 8))
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert MaskedDiceCELoss()(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)


def test_ignored_voxels_have_exactly_zero_gradient_and_do_not_change_the_loss() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 8, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (1, 1, 8, 8, 8))
    target[:, :, :4] = IGNORE_LABEL  # half the volume is a rejected organ
    loss = MaskedDiceCELoss()(logits, target)
    loss.backward()
    assert logits.grad[:, :, :4].abs().max().item() == 0.0
    assert logits.grad[:, :, 4:].abs().max().item() > 1e-4
    # whatever the network predicts in the ignored half, the loss is the same
    other = logits.detach().clone()
    other[:, :, :4] = torch.randn_like(other[:, :, :4]) * 10
    assert MaskedDiceCELoss()(other, target).item() == pytest.approx(loss.item(), rel=1e-6)
    # and it is not the loss that treats the ignored half as background
    as_background = target.clone()
    as_background[as_background == IGNORE_LABEL] = 0
    assert MaskedDiceCELoss()(logits, as_background).item() != pytest.approx(loss.item(), rel=1e-3)


def test_all_ignored_gives_zero_loss_and_bad_target_shape_is_refused() -> None:
    logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    loss = MaskedDiceCELoss()(logits, torch.full((1, 1, 4, 4, 4), IGNORE_LABEL))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().max().item() == 0.0
    with pytest.raises(ValueError, match="class ids"):
        MaskedDiceCELoss()(logits, torch.zeros(1, 3, 4, 4, 4))
