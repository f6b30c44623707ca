"""Sliding-window inference whose output is a label map, decided slab by slab.

MONAI's ``sliding_window_inference`` stitches a float ``(B, C, *spatial)`` map of the whole volume
before anything else can happen; for a UKBOB whole-body scan (73 classes, 224 x 174 x 370) that map
alone is 4.2 GB, and the usual post-processing (activation, inversion of probabilities, argmax) makes
more full-size float copies. Here the same windows, with the same importance weights, are visited in
order along one axis (by default the longest); a slab of the stitched map is turned into labels as soon
as no later window touches it, then freed. Only about one window's depth of the C-channel map is ever
held, and the result is the same as ``argmax`` (softmax) or ``> 0`` (sigmoid) of MONAI's stitched
output: the per-voxel normalisation by the summed weights is positive, so it changes neither.

- :func:`sliding_window_labels`: the function (array in, labels out).
- :class:`StreamingSlidingWindowInferer`: the MONAI ``Inferer`` over it, for bundle configs
  (``"inferer"``); its output keeps the input's metadata, so ``Invertd`` brings it back to the input's
  grid with nearest-neighbour interpolation.
"""

from __future__ import annotations

import bisect
import inspect
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import Inferer
from monai.inferers.utils import _get_scan_interval
from monai.utils import BlendMode, PytorchPadMode, ensure_tuple_rep, fall_back_tuple, look_up_option

from custom.attention import fused_window_attention

__all__ = ["sliding_window_labels", "decide_labels", "float_dtype", "StreamingSlidingWindowInferer"]


def float_dtype(value: torch.dtype | str) -> torch.dtype:
    """A floating-point ``torch.dtype`` from itself or its name (``"float16"`` in a bundle config)."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"buffer dtype must be a floating-point torch dtype or its name, got {value!r}")
    return dtype


def decide_labels(scores: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """Labels from pre-activation scores ``(B, C, *spatial)`` (logits, or any positive rescaling of them).

    ``softmax``: ``(B, 1, *spatial)`` class index (argmax over C), uint8 when C <= 256;
    ``sigmoid``: ``(B, C, *spatial)`` uint8, 1 where the score is above 0 (probability above 0.5).
    """
    if activation == "softmax":
        dtype = torch.uint8 if scores.shape[1] <= 256 else torch.int32
        return scores.argmax(dim=1, keepdim=True).to(dtype)
    if activation == "sigmoid":
        return (scores > 0).to(torch.uint8)
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


def sliding_window_labels(
    inputs: torch.Tensor,
    roi_size: Sequence[int] | int,
    sw_batch_size: int,
    predictor: Callable[..., torch.Tensor],
    overlap: Sequence[float] | float = 0.25,
    mode: BlendMode | str = BlendMode.CONSTANT,
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: PytorchPadMode | str = PytorchPadMode.CONSTANT,
    cval: float = 0.0,
    activation: str = "softmax",
    axis: int | None = None,
    buffer_dtype: torch.dtype = torch.float32,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """Sliding-window inference that returns labels, holding only a slab of the score map at a time.

    Args:
        inputs: ``(B, C_in, *spatial)`` image.
        roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval: as MONAI's
            ``sliding_window_inference``; the windows and their weights are the ones it uses.
        predictor: ``f(windows (N, C_in, *roi_size)) -> scores (N, C, *roi_size)`` (logits).
        activation: ``"softmax"`` -> ``(B, 1, *spatial)`` argmax; ``"sigmoid"`` -> ``(B, C, *spatial)``
            binary maps (see :func:`decide_labels`).
        axis: spatial axis (0-based) along which slabs are finished and freed; default the longest.
        buffer_dtype: dtype of the stitching buffer (float32; float16 halves its memory).
        args, kwargs: passed on to ``predictor``.

    Returns:
        uint8 labels on ``inputs``' device and spatial shape.
    """
    batch, _, *image_size_ = inputs.shape
    nd = len(image_size_)
    roi_size = fall_back_tuple(roi_size, image_size_)
    overlap = ensure_tuple_rep(overlap, nd)
    if any(o < 0 or o >= 1 for o in overlap):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    axis = max(range(nd), key=lambda d: image_size_[d]) if axis is None else axis % nd

    # pad to at least one window, as sliding_window_inference does (pad pairs run from the last axis)
    image_size = tuple(max(s, r) for s, r in zip(image_size_, roi_size))
    pad: list[int] = []
    for d in reversed(range(nd)):
        diff = image_size[d] - image_size_[d]
        pad += [diff // 2, diff - diff // 2]
    if any(pad):
        inputs = F.pad(inputs, pad=pad, mode=look_up_option(padding_mode, PytorchPadMode), value=cval)

    scan_interval = _get_scan_interval(image_size, roi_size, nd, overlap)
    windows = sorted(dense_patch_slices(image_size, roi_size, scan_interval), key=lambda w: w[axis].start)
    weight = compute_importance_map(roi_size, mode=mode, sigma_scale=sigma_scale, device=inputs.device, dtype=buffer_dtype)
    weight = weight.reshape(roi_size)

    # slab edges along `axis`: every window start and end, so a slab is finished as soon as it can be
    edges = sorted({w[axis].start for w in windows} | {w[axis].stop for w in windows})
    slabs: dict[int, torch.Tensor] = {}  # slab index -> (B, C, depth, ...) summed weighted scores
    labels: torch.Tensor | None = None
    jobs = [(b, w) for w in windows for b in range(batch)]

    def finish(until: int) -> None:
        """Turn every slab that ends at or before ``until`` into labels and free it."""
        for k in sorted(slabs):
            if edges[k + 1] > until:
                break
            index = [slice(None)] * (nd + 2)
            index[axis + 2] = slice(edges[k], edges[k + 1])
            labels[tuple(index)] = decide_labels(slabs.pop(k), activation)

    for start in range(0, len(jobs), sw_batch_size):
        group = jobs[start : start + sw_batch_size]
        scores = predictor(torch.cat([inputs[(slice(b, b + 1), slice(None), *w)] for b, w in group]), *args, **kwargs)
        if labels is None:
            channels = 1 if activation == "softmax" else scores.shape[1]
            labels = torch.zeros((batch, channels, *image_size), dtype=torch.uint8, device=inputs.device)
        for (b, w), score in zip(group, scores):
            lo, hi = w[axis].start, w[axis].stop
            for k in range(bisect.bisect_left(edges, lo), bisect.bisect_left(edges, hi)):
                if k not in slabs:
                    shape = [batch, score.shape[0], *image_size]
                    shape[axis + 2] = edges[k + 1] - edges[k]
                    slabs[k] = torch.zeros(shape, dtype=buffer_dtype, device=inputs.device)
                part = slice(edges[k] - lo, edges[k + 1] - lo)
                src = [slice(None)] * nd
                src[axis] = part
                dst = list(w)
                dst[axis] = slice(None)
                slabs[k][(b, slice(None), *dst)].addcmul_(score[(slice(None), *src)].to(buffer_dtype), weight[tuple(src)])
        following = jobs[start + sw_batch_size][1][axis].start if start + sw_batch_size < len(jobs) else image_size[axis]
        finish(following)
    assert not slabs and labels is not None

    if any(pad):
        crop = [slice(None), slice(None)]
        for d in range(nd):
            before = pad[2 * (nd - 1 - d)]
            crop.append(slice(before, before + image_size_[d]))
        labels = labels[tuple(crop)]
    return labels


#: the window and decision settings of :func:`sliding_window_labels` (name -> default), shared by its Inferer
WINDOW_ARGS = {name: p.default for name, p in inspect.signature(sliding_window_labels).parameters.items()
               if p.default is not inspect.Parameter.empty and name != "sw_batch_size"}


class StreamingSlidingWindowInferer(Inferer):
    """MONAI ``Inferer`` over :func:`sliding_window_labels`: window settings as ``SlidingWindowInferer``.

    Called as ``inferer(inputs, network)`` it returns the uint8 label map (``(B, 1, *spatial)`` for
    softmax, ``(B, C, *spatial)`` for sigmoid) with ``inputs``' metadata, so a bundle's ``Invertd``
    (``nearest_interp``) takes it back to the input's grid. ``custom.transforms.LogitsToLabelsd`` in the
    post-processing leaves such maps as they are and decides the float maps of other inferers (ETTA).
    With ``fused_attention=True`` (default) MONAI Swin window attention runs through
    ``scaled_dot_product_attention`` during the call (:mod:`custom.attention`): same labels up to float
    rounding, no attention matrices, which were most of a Swin-UNETR window's memory.
    """

    def __init__(
        self, roi_size: Sequence[int] | int, sw_batch_size: int = 1, fused_attention: bool = True, **window: Any
    ) -> None:
        """``window``: keyword arguments of :func:`sliding_window_labels` (:data:`WINDOW_ARGS`: ``overlap``,
        ``mode``, ``sigma_scale``, ``padding_mode``, ``cval``, ``activation``, ``axis``, ``buffer_dtype``),
        documented there once, with its defaults; each becomes an attribute. An unknown name is a
        ``TypeError`` here, not at the first call."""
        super().__init__()
        self.fused_attention = bool(fused_attention)
        unknown = set(window) - set(WINDOW_ARGS)
        if unknown:
            raise TypeError(f"unknown sliding-window argument(s) {sorted(unknown)}; known: {list(WINDOW_ARGS)}")
        if "buffer_dtype" in window:
            window["buffer_dtype"] = float_dtype(window["buffer_dtype"])
        if window.get("activation", "softmax") not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {window['activation']!r}")
        self.roi_size, self.sw_batch_size = roi_size, int(sw_batch_size)
        vars(self).update({**WINDOW_ARGS, **window})

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        predictor = (lambda windows: network(windows, *args, **kwargs)) if args or kwargs else network
        enabled = self.fused_attention and isinstance(network, torch.nn.Module)
        with fused_window_attention(network, enabled):
            labels = sliding_window_labels(inputs, self.roi_size, self.sw_batch_size, predictor,
                                           **{name: getattr(self, name) for name in WINDOW_ARGS})
        if isinstance(inputs, MetaTensor):
            labels = MetaTensor(labels).copy_meta_from(inputs, copy_attr=False)
        return labels
