"""The sliding-window plan of one volume, identical to :func:`monai.inferers.sliding_window_inference`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.utils import PytorchPadMode, ensure_tuple_rep, fall_back_tuple, look_up_option

__all__ = ["WindowPlan"]


class WindowPlan:
    """Sliding-window geometry for one volume, identical to :func:`monai.inferers.sliding_window_inference`.

    Holds the padded input, the window slices, the importance map (on ``sw_device``) and one
    volume-sized map ``weight = 1 / summed importance`` (on ``device``, zero on padding): it both
    normalises the stitched sum and weights each window voxel's entropy in the loss.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        roi_size: Sequence[int] | int,
        overlap: Sequence[float] | float,
        mode: str,
        sigma_scale: Sequence[float] | float,
        padding_mode: str,
        cval: float,
        sw_device: torch.device | str,
        device: torch.device | str,
    ) -> None:
        """``inputs``: ``(1, C_in, *spatial)``; the other arguments as in :func:`sliding_window_inference`."""
        spatial = list(inputs.shape[2:])
        nd = len(spatial)
        self.roi = tuple(fall_back_tuple(roi_size, spatial))
        self.image_size = tuple(max(spatial[i], self.roi[i]) for i in range(nd))
        pad: list[int] = []
        for k in range(len(inputs.shape) - 1, 1, -1):
            diff = max(self.roi[k - 2] - inputs.shape[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        self.sw_device, self.device = torch.device(sw_device), torch.device(device)
        self.inputs = F.pad(inputs, pad=pad, mode=look_up_option(padding_mode, PytorchPadMode), value=cval) if any(pad) else inputs
        # crop back to the input grid: pad is given last-axis first
        self.crop = tuple(slice(pad[2 * (nd - 1 - d)], pad[2 * (nd - 1 - d)] + spatial[d]) for d in range(nd))
        interval = []
        for d, o in zip(range(nd), ensure_tuple_rep(overlap, nd)):
            if not 0 <= o < 1:
                raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}.")
            interval.append(self.roi[d] if self.roi[d] == self.image_size[d] else max(int(self.roi[d] * (1 - o)), 1))
        self.slices = dense_patch_slices(self.image_size, self.roi, interval)
        # each window's part inside the input grid: (where it goes in the output, where it lies in the window)
        self.spatial = tuple(spatial)
        self.parts = []
        for s in self.slices:
            lo = [max(s[d].start, self.crop[d].start) for d in range(nd)]
            hi = [min(s[d].stop, self.crop[d].stop) for d in range(nd)]
            dst = tuple(slice(lo[d] - self.crop[d].start, hi[d] - self.crop[d].start) for d in range(nd))
            src = tuple(slice(lo[d] - s[d].start, hi[d] - s[d].start) for d in range(nd))
            self.parts.append((dst, src))
        self.importance = compute_importance_map(self.roi, mode=mode, sigma_scale=sigma_scale, device=sw_device, dtype=torch.float32)[None, None]
        imp = self.importance.to(device)
        count = torch.zeros((1, 1, *self.image_size), dtype=torch.float32, device=device)
        for s in self.slices:
            count[(slice(None), slice(None), *s)] += imp
        self.weight = torch.zeros_like(count)
        self.weight[(slice(None), slice(None), *self.crop)] = 1.0 / count[(slice(None), slice(None), *self.crop)]
        del count
        # each window's share of the loss (the shares of all windows sum to the number of input voxels)
        self.window_mass = np.array([float((self.weight[(slice(None), slice(None), *s)] * imp).sum()) for s in self.slices])

    def window(self, idx: Sequence[int]) -> torch.Tensor:
        """The windows ``idx`` of the padded input, ``(len(idx), C_in, *roi)`` on ``sw_device``."""
        return torch.cat([self.inputs[(slice(None), slice(None), *self.slices[i])] for i in idx]).to(self.sw_device)

    def batches(self, size: int, adapt: set[int]) -> list[list[int]]:
        """Window indices in batches of consecutive windows of one kind (in ``adapt`` or not), ``size`` at most."""
        batches: list[list[int]] = []
        for i in range(len(self.slices)):
            if not batches or len(batches[-1]) == size or (i in adapt) != (batches[-1][0] in adapt):
                batches.append([])
            batches[-1].append(i)
        return batches

    def spread(self, fraction: float) -> tuple[set[int], float]:
        """``fraction`` of the windows, evenly spread (at least one), and their summed loss share."""
        n = len(self.slices)
        chosen = set(np.unique(np.linspace(0, n - 1, max(1, round(fraction * n))).round().astype(int)).tolist())
        return chosen, float(self.window_mass[sorted(chosen)].sum())
