"""Loss that masks SOLF's ignore value.

MONAI 1.6.1's ``DiceLoss`` accepts ``ignore_index`` but ``DiceCELoss`` does not, so this module
combines the two pieces that do: ``monai.losses.DiceLoss(ignore_index=...)`` and
``torch.nn.CrossEntropyLoss(ignore_index=...)``. Voxels labelled with the ignore value contribute
nothing to either term (their gradient is exactly zero), so an organ that SOLF rejected is taught
neither as that organ nor as background.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss

from custom.labels import IGNORE_LABEL


class MaskedDiceCELoss(torch.nn.Module):
    """Dice + cross-entropy for softmax segmentation with an ignore value in the target.

    Args:
        ignore_index: target value to leave out (SOLF's ``IGNORE_LABEL``, 255).
        lambda_dice, lambda_ce: weights of the two terms.
        include_background, squared_pred, smooth_nr, smooth_dr, batch: as in ``monai.losses.DiceLoss``.

    Shapes: ``input`` logits ``(B, C, H, W, D)``; ``target`` class ids ``(B, 1, H, W, D)`` (values
    ``0..C-1`` or ``ignore_index``). Returns a scalar.
    """

    def __init__(
        self,
        ignore_index: int = IGNORE_LABEL,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        include_background: bool = True,
        squared_pred: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
    ):
        super().__init__()
        self.ignore_index, self.lambda_dice, self.lambda_ce = ignore_index, lambda_dice, lambda_ce
        self.dice = DiceLoss(
            include_background=include_background, to_onehot_y=True, softmax=True, squared_pred=squared_pred,
            smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch, ignore_index=ignore_index,
        )
        self.ce = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim != input.ndim or target.shape[1] != 1:
            raise ValueError(f"target must be class ids of shape (B, 1, ...), got {tuple(target.shape)}")
        input = input.as_subclass(torch.Tensor)  # MetaTensor -> plain tensor: CE wants plain inputs
        ids = target.as_subclass(torch.Tensor).long()
        if bool((ids == self.ignore_index).all()):
            return input.sum() * 0.0  # every voxel ignored: a zero loss that keeps the graph
        dice = self.dice(input, ids) if self.lambda_dice else input.new_zeros(())
        ce = self.ce(input, ids[:, 0]) if self.lambda_ce else input.new_zeros(())
        return self.lambda_dice * dice + self.lambda_ce * ce
