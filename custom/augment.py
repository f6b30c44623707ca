"""Training augmentation for a training set of very few patients (the CPU recipe of ``custom.demo``).

A hollow organ looks different from patient to patient: the one labelled training CT of the sample data has
a collapsed stomach (131 mL of even soft tissue), the held-out patient a filled one (an enhancing wall
around a darker lumen), and filled bowel, which looks like the latter, is background in the training labels.
:func:`distend_organ` grows the labelled organ into the unlabelled tissue around it and paints it as a
filled one; :class:`RandDistendOrgand` applies it to a random share of the training crops.

Not imported by any bundle config: the bundles train on real cohorts, where filled and collapsed stomachs
both occur.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform


def distend_organ(
    image: torch.Tensor, label: torch.Tensor, organ: int, radius: tuple[int, int, int], wall: float, lumen: float,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow ``organ`` by ``radius`` voxels per axis into background (never into another organ) and paint it filled.

    Args:
        image: ``(C, H, W, D)`` intensities (the model's scaled range, e.g. 0..1 after the CT window).
        label: ``(1, H, W, D)`` integer label map on the same grid.
        organ: the label id to distend; maps without it are returned unchanged.
        radius: growth in voxels along H, W, D (a box dilation).
        wall, lumen: the intensities of the grown organ's one-voxel outer layer and of its inside.
        noise: optional ``image``-shaped tensor added to the painted voxels.

    Returns:
        ``(image, label)``, new tensors: the grown region labelled ``organ``, its outer layer set to ``wall``
        and its inside to ``lumen`` (plus ``noise``) in every channel.
    """
    mask = label == organ
    if not bool(mask.any()):
        return image, label
    kernel = tuple(2 * r + 1 for r in radius)
    grown = F.max_pool3d(mask.float(), kernel, stride=1, padding=tuple(radius)) > 0
    grown &= (label == 0) | mask
    inner = -F.max_pool3d(-grown.float(), 3, stride=1, padding=1) > 0  # erosion by one voxel
    outer = grown & ~inner
    painted = image.clone()
    for region, value in ((outer, wall), (inner, lumen)):
        region = region.expand_as(image)
        painted[region] = value + (noise[region] if noise is not None else 0.0)
    grown_label = label.clone()
    grown_label[grown] = organ
    return painted, grown_label


class RandDistendOrgand(RandomizableTransform, MapTransform):
    """With probability ``prob``, distend each of ``organs`` (:func:`distend_organ`) by a random radius.

    Args:
        keys: image keys to paint (their labels come from ``label_key``).
        label_key: the label map, grown alike.
        organs: label ids to distend (BTCV stomach: 7).
        radius: in-plane growth in voxels, drawn as an integer in ``[radius[0], radius[1]]``; along the last
            axis it is scaled by the in-plane / through-plane spacing ratio of the image (``pixdim`` of a
            MetaTensor), so the growth is the same in mm (6 x 6 x 3 mm voxels: 1..4 -> 6..24 mm).
        wall, lumen: ranges the wall and lumen intensities are drawn from (one value each per organ and
            crop), in the image's scaled range.
        noise_std: standard deviation of Gaussian noise on the painted voxels.

    Input and output: a dict of channel-first tensors ``(C, H, W, D)`` (MetaTensors keep their metadata).
    """

    def __init__(
        self, keys: KeysCollection, label_key: str = "label", organs: Sequence[int] = (7,), prob: float = 0.5,
        radius: tuple[int, int] = (1, 3), wall: tuple[float, float] = (0.5, 0.7), lumen: tuple[float, float] = (0.3, 0.5),
        noise_std: float = 0.03, allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key, self.organs, self.radius = label_key, tuple(organs), tuple(radius)
        self.wall, self.lumen, self.noise_std = tuple(wall), tuple(lumen), noise_std

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        label = torch.as_tensor(d[self.label_key])
        for organ in self.organs:
            if not bool((label == organ).any()):
                continue
            r = int(self.R.randint(self.radius[0], self.radius[1] + 1))
            radius = (r, r, r * self._z_ratio(label))
            new_label = label
            for key in self.key_iterator(d):
                img = torch.as_tensor(d[key])
                noise = torch.as_tensor(self.R.normal(0, self.noise_std, img.shape), dtype=img.dtype)
                wall, lumen = float(self.R.uniform(*self.wall)), float(self.R.uniform(*self.lumen))
                d[key], new_label = distend_organ(img, label, organ, radius, wall, lumen, noise)
            label = new_label
        d[self.label_key] = label
        return d

    @staticmethod
    def _z_ratio(label: Any) -> int:
        pixdim = getattr(label, "pixdim", None)
        if pixdim is None:
            return 1
        sx, _, sz = (float(p) for p in np.asarray(pixdim)[:3])
        return max(1, round(sx / sz))
