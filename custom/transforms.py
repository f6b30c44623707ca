"""Small MONAI transforms that MONAI itself has no component for.

Left-right flip that swaps paired labels (``SPEC.md`` section 5): flipping a body left-right without
relabelling teaches the network that the left kidney is on the right. :class:`FlipSwapLR` flips the
image with ``monai.transforms.Flip`` (metadata and applied-operation tracking included) and maps each
left id to its right id and back. Lung lobes have no one-to-one partner (2 left, 3 right lobes), so a
label map that contains lobes is either not flipped (``lung_policy="skip"``, default) or flipped
with its lobes set to the ignore value that the loss masks (``"ignore"``).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Flip, MapTransform, RandomizableTransform, Transform

from custom.labels import IGNORE_LABEL, UKBOB_LR_PAIRS, UKBOB_LUNG_LOBE_IDS

LUNG_POLICIES = ("skip", "ignore", "error")


def swap_table(pairs: Sequence[tuple[int, int]], size: int = 256) -> torch.Tensor:
    """Lookup table id -> id with each (left, right) pair exchanged; all other ids unchanged."""
    table = torch.arange(size)
    for left, right in pairs:
        table[left], table[right] = right, left
    return table


class FlipSwapLR(Transform):
    """Flip a label map left-right and swap its paired left/right ids.

    Input: channel-first label map ``(1, H, W, D)`` (tensor, MetaTensor or NumPy) in an orientation
    where ``spatial_axis`` is left-right (axis 0 after ``Orientationd(axcodes="RAS")``).
    Output: the flipped, relabelled map (same type). Raises ``ValueError`` when the map contains an
    id of ``unpaired_ids`` (lung lobes) and ``unpaired="error"``; with ``"ignore"`` those voxels
    become ``ignore_value``.
    """

    def __init__(
        self,
        spatial_axis: int = 0,
        pairs: Sequence[tuple[int, int]] = UKBOB_LR_PAIRS,
        unpaired_ids: frozenset[int] | set[int] = UKBOB_LUNG_LOBE_IDS,
        unpaired: str = "error",
        ignore_value: int = IGNORE_LABEL,
    ):
        if unpaired not in ("error", "ignore"):
            raise ValueError(f"unpaired must be 'error' or 'ignore', got {unpaired!r}")
        self.flip = Flip(spatial_axis=spatial_axis)
        self.table = swap_table(pairs, size=max(256, ignore_value + 1))
        if unpaired == "ignore":
            for i in unpaired_ids:
                self.table[i] = ignore_value
        self.unpaired_ids, self.unpaired = tuple(unpaired_ids), unpaired

    def has_unpaired(self, label: Any) -> bool:
        lab = torch.as_tensor(label)
        return bool(torch.isin(lab, torch.tensor(self.unpaired_ids, dtype=lab.dtype)).any()) if self.unpaired_ids else False

    def __call__(self, label: Any) -> Any:
        if self.unpaired == "error" and self.has_unpaired(label):
            raise ValueError("the label map contains lung lobes, which have no left/right partner: not flipping it")
        was_numpy = isinstance(label, np.ndarray)
        flipped = self.flip(torch.as_tensor(label) if was_numpy else label)
        ids = flipped.long().as_subclass(torch.Tensor)
        swapped = self.table.to(ids.device)[ids].to(flipped.dtype)
        if was_numpy:
            return swapped.numpy().astype(label.dtype)
        flipped.data = swapped  # keep MetaTensor metadata and the applied Flip
        return flipped


class RandFlipSwapLRd(RandomizableTransform, MapTransform):
    """Random left-right flip of image and label keys together, swapping paired label ids.

    Args:
        keys: every key to flip (images and labels).
        label_keys: the subset of ``keys`` holding label maps (relabelled after the flip).
        prob: probability of flipping a sample.
        spatial_axis: the left-right axis (0 in RAS).
        lung_policy: ``"skip"`` (default: samples whose labels contain lung lobes are never flipped),
            ``"ignore"`` (flip; lobes become ``ignore_value``) or ``"error"``.

    Input: dict of channel-first arrays ``(C, H, W, D)``; output: the same keys, all flipped or none.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = ("label",),
        prob: float = 0.5,
        spatial_axis: int = 0,
        pairs: Sequence[tuple[int, int]] = UKBOB_LR_PAIRS,
        lung_policy: str = "skip",
        ignore_value: int = IGNORE_LABEL,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if lung_policy not in LUNG_POLICIES:
            raise ValueError(f"lung_policy must be one of {LUNG_POLICIES}, got {lung_policy!r}")
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.lung_policy = lung_policy
        unpaired = "ignore" if lung_policy == "ignore" else "error"
        self.label_flip = FlipSwapLR(spatial_axis, pairs, UKBOB_LUNG_LOBE_IDS, unpaired, ignore_value)
        self.image_flip = Flip(spatial_axis=spatial_axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        if self.lung_policy == "skip" and any(
            self.label_flip.has_unpaired(d[k]) for k in self.key_iterator(d) if k in self.label_keys
        ):
            return d
        for key in self.key_iterator(d):
            d[key] = self.label_flip(d[key]) if key in self.label_keys else self.image_flip(d[key])
        return d
