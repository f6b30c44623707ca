"""ETTA: entropy test-time adaptation as a MONAI inferer (``SPEC.md`` section 3).

:class:`EntropyTTAInferer` is a drop-in replacement for :class:`monai.inferers.SlidingWindowInferer`.
For every input volume it

1. freezes the network except the affine scale and shift of its normalisation layers (LayerNorm in
   Swin-UNETR; affine GroupNorm / InstanceNorm / BatchNorm elsewhere);
2. runs K sliding-window passes; each pass back-propagates the mean voxel entropy window by window
   (gradients accumulate, no graph ever spans the stitched volume), stitches that pass's prediction
   P_k from the same forward outputs, and then takes one optimiser step;
3. runs one last forward pass for P_K, and returns ``sum_k w_k P_k`` with ``w = softmax(-H / tau)``
   over k = 0..K (H_k: mean voxel entropy of the stitched P_k);
4. restores the network exactly (parameters, ``requires_grad`` flags, train/eval mode), unless
   ``online=True``, which keeps the adapted parameters and the optimiser state for the next volume.

Cost: K + 1 forward passes and K backward passes over the windows; memory: one window's graph plus
two output-sized buffers (the current pass and the running weighted combination). One window's graph
is kept small in two ways. (1) ``fused_attention=True`` (default) runs MONAI's Swin window attention
through ``torch.nn.functional.scaled_dot_product_attention`` during ETTA's passes, with gradients too
(MONAI's own ``use_flash_attention`` acts only without gradients), and applies shifted-window masks per
group of windows sharing one: the backward then keeps no ``windows x heads x n x n`` attention
matrices or biases, which were most of the graph (a 64^3 window of a feature_size-12 Swin-UNETR:
stages 1-3 kept ~610 MB of the ~760 MB saved for backward). The network's own forward is back after
every volume. (2) The entropy loss is one autograd function (:func:`weighted_entropy_sum`) whose
backward keeps only log P (softmax) or the logits (sigmoid). Measured with
``benchmarks/etta_cost.py`` (README, "ETTA results measured here").

The returned tensor is what the bundles' unchanged post-processing expects from a network: for
``activation="softmax"`` it is ``log(P)`` (``softmax(log P) == P``, ``argmax`` unchanged), for
``"sigmoid"`` it is ``logit(P)`` (``sigmoid(logit P) == P``).

Loss: each window contributes its per-voxel entropy times the blending weight of that voxel
(importance map / summed importance), so a full pass minimises the mean over voxels of the
blended window entropies; where windows do not overlap this is exactly the entropy of the stitched
prediction. The recorded H_k are always the exact entropies of the stitched predictions.

:class:`ETTAStatsHandler` puts the per-volume entropies, weights and times into ``engine.state``
(``engine.state.metrics["etta_*"]`` and the list ``engine.state.etta``) and logs one line per volume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import types
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import Inferer
from monai.utils import BlendMode, PytorchPadMode, convert_to_dst_type, ensure_tuple_rep, fall_back_tuple, look_up_option
from torch import nn

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "EntropyTTAInferer",
    "ETTAStatsHandler",
    "entropy_weights",
    "fused_window_attention",
    "norm_affine_parameters",
    "sigmoid_entropy",
    "softmax_entropy",
    "weighted_entropy_sum",
]

logger = logging.getLogger(__name__)

#: normalisation layers whose affine scale/shift ETTA adapts (BatchNorm and InstanceNorm share _NormBase)
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", None)) if t
)
_EPS = 1e-6  # clamp for log(P) / logit(P) of the returned map


# ------------------------------------------------------------------------------------ entropies
def softmax_entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Per-voxel entropy (nats) of ``softmax(logits)`` over ``dim``; shape of ``logits`` with ``dim`` kept as 1."""
    logits = logits.float()
    log_p = torch.log_softmax(logits, dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim, keepdim=True)


def sigmoid_entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Per-voxel sum over channels of the binary entropies (nats) of ``sigmoid(logits)``; ``dim`` kept as 1.

    Uses ``H = p * softplus(-z) + (1 - p) * softplus(z)``, stable for any logit ``z``.
    """
    z = logits.float()
    p = torch.sigmoid(z)
    return (p * F.softplus(-z) + (1.0 - p) * F.softplus(z)).sum(dim=dim, keepdim=True)


class _WeightedEntropySum(torch.autograd.Function):
    """``sum(H(logits) * weight)`` whose backward keeps one ``C x window`` tensor (log P or the logits).

    Softmax: ``dH/dz_j = -p_j (log p_j + H)``, from the saved ``log p`` and ``H``; sigmoid (summed binary
    entropies): ``dH/dz = -z p (1 - p)``, from the saved logits. The plain autograd graph of
    :func:`softmax_entropy` keeps ``log p``, ``p`` and their product instead.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, weight: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.activation = activation
        if activation == "softmax":
            log_p = torch.log_softmax(logits, dim=1)
            h = log_p.exp().mul_(log_p).sum(dim=1, keepdim=True).neg_()
            ctx.save_for_backward(log_p, h, weight)
        else:
            h = sigmoid_entropy(logits)
            ctx.save_for_backward(logits, weight)
        return (h * weight).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.activation == "softmax":
            log_p, h, weight = ctx.saved_tensors
            grad = (log_p + h).mul_(log_p.exp())  # -dH/dz
        else:
            z, weight = ctx.saved_tensors
            grad = torch.sigmoid(z)
            grad.mul_(1.0 - grad).mul_(z)  # -dH/dz
        return grad.mul_(weight * -grad_out), None, None


def weighted_entropy_sum(logits: torch.Tensor, weight: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """``(H * weight).sum()`` with H the per-voxel :func:`softmax_entropy` or :func:`sigmoid_entropy` of ``logits``
    (float32) and ``weight`` broadcastable to ``(B, 1, *spatial)``; same value and gradient as the
    composed functions, with a backward that keeps only log P (softmax) or the logits (sigmoid)."""
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
    return _WeightedEntropySum.apply(logits.float(), weight.to(torch.float32), activation)


def _prob_entropy_mean(prob: torch.Tensor, activation: str, chunk: int = 8) -> float:
    """Mean voxel entropy (nats) of a probability map ``(1, C, *spatial)``, computed in slabs along the last axis."""
    total, count = 0.0, 0
    for start in range(0, prob.shape[-1], chunk):
        p = prob[..., start : start + chunk].float()
        if activation == "softmax":
            h = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
        else:
            q = (1.0 - p).clamp_min(1e-12)
            h = -(p * torch.log(p.clamp_min(1e-12)) + q * torch.log(q)).sum(1)
        total += float(h.sum(dtype=torch.float64))
        count += h.numel()
    return total / count


def entropy_weights(entropies: Sequence[float], tau: float) -> np.ndarray:
    """``softmax(-H / tau)``: the weights of the candidates P_0..P_K (sum 1; tau -> 0 picks the lowest H)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}.")
    s = -np.asarray(entropies, dtype=np.float64) / tau
    w = np.exp(s - s.max())
    return w / w.sum()


def norm_affine_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The affine scale and shift parameters of every normalisation layer of ``network`` that has them.

    LayerNorm (``elementwise_affine``), GroupNorm / InstanceNorm / BatchNorm (``affine``) and RMSNorm;
    non-affine layers (Swin-UNETR's InstanceNorm in its conv blocks) have none and are skipped.
    """
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in network.modules():
        if not isinstance(module, NORM_TYPES):
            continue
        for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


# --------------------------------------------------------------------- memory-saving attention
def _mask_groups(mask: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Windows with the same shifted-window mask: (a representative window per group, group id of each window).

    Groups by a fingerprint, ``mask @ R`` for a fixed random ``R`` (n x 2), which tells different masks apart
    (0 / -100 masks give different sums of random numbers) at the cost of one matrix-vector pass. It is
    taken in float32 with autocast off, so float16 rounding cannot merge two masks; were identical
    masks ever split into two groups, the result would still be exact.
    """
    nw, n = mask.shape[0], mask.shape[-1]
    proj = torch.randn(n, 2, generator=torch.Generator().manual_seed(20240613)).to(mask.device)
    with torch.autocast(mask.device.type, enabled=False):
        fp = (mask.float() @ proj).reshape(nw, -1)
    _, inverse = torch.unique(fp, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), nw, dtype=torch.long, device=mask.device)
    first.scatter_reduce_(0, inverse, torch.arange(nw, device=mask.device), reduce="amin")
    return first.tolist(), inverse


def _sdpa_window_attention_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MONAI ``WindowAttention.forward`` through ``scaled_dot_product_attention``, with or without gradients.

    Same result as MONAI's default path up to float rounding. Its backward keeps no
    ``windows x heads x n x n`` attention matrix (the fused kernel keeps q, k, v, the output and one
    log-sum-exp per query), and shifted-window masks are applied per group of windows that share one
    (at most 2^3 groups in 3D), so no per-window ``heads x n x n`` bias is kept either.
    """
    b, n, c = x.shape
    heads = self.num_heads
    q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    index = self.relative_position_index[:n, :n].reshape(-1)
    bias = self.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1).unsqueeze(0).to(q.dtype)
    drop = self.attn_drop.p if self.training else 0.0

    def attend(qg, kg, vg, m):
        return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=m, dropout_p=drop, scale=self.scale)

    if mask is None:
        out = attend(q, k, v, bias)
    else:
        nw = mask.shape[0]
        first, inverse = _mask_groups(mask)
        if len(first) == 1:
            out = attend(q, k, v, bias + mask[first[0]].to(q.dtype))
        else:
            inverse = inverse.repeat(b // nw)  # windows are batch-major: (b // nw, nw)
            order = torch.argsort(inverse, stable=True)
            counts = torch.bincount(inverse, minlength=len(first)).tolist()
            parts = [
                attend(qg, kg, vg, bias + mask[r].to(q.dtype))
                for qg, kg, vg, r in zip(q[order].split(counts), k[order].split(counts), v[order].split(counts), first)
            ]
            out = torch.cat(parts)[torch.argsort(order)]
    out = out.transpose(1, 2).reshape(b, n, c)
    return self.proj_drop(self.proj(out))


def _is_monai_window_attention(module: nn.Module) -> bool:
    try:
        from monai.networks.nets.swin_unetr import WindowAttention
    except ImportError:  # pragma: no cover
        return False
    # only MONAI's own forward (a subclass that overrides it keeps its forward)
    return isinstance(module, WindowAttention) and type(module).forward is WindowAttention.forward


@contextlib.contextmanager
def fused_window_attention(network: nn.Module, enabled: bool = True):
    """Within the block, every MONAI Swin ``WindowAttention`` of ``network`` runs through
    ``torch.nn.functional.scaled_dot_product_attention``, with gradients too; yields how many modules.

    MONAI's own ``use_flash_attention`` switch acts only while autograd is off, so it cannot lower the
    memory of ETTA's backward pass; this one does (see :func:`_sdpa_window_attention_forward`). The
    modules' ``forward`` is put back on exit, also on an exception.
    """
    patched = []
    if enabled:
        for module in network.modules():
            if _is_monai_window_attention(module) and "forward" not in vars(module):
                module.forward = types.MethodType(_sdpa_window_attention_forward, module)
                patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


# ------------------------------------------------------------------------------- window plan
class _WindowPlan:
    """Sliding-window geometry for one volume, identical to :func:`monai.inferers.sliding_window_inference`.

    Holds the padded input, the window slices, the importance map (on ``sw_device``) and one
    volume-sized map ``weight = 1 / summed importance`` (on ``device``, zero on padding): it both
    normalises the stitched sum and weights each window voxel's entropy in the loss.
    """

    def __init__(self, inputs, roi_size, overlap, mode, sigma_scale, padding_mode, cval, sw_device, device):
        spatial = list(inputs.shape[2:])
        nd = len(spatial)
        self.roi = tuple(fall_back_tuple(roi_size, spatial))
        self.image_size = tuple(max(spatial[i], self.roi[i]) for i in range(nd))
        pad: list[int] = []
        for k in range(len(inputs.shape) - 1, 1, -1):
            diff = max(self.roi[k - 2] - inputs.shape[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
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

    def window(self, idx: Sequence[int], device) -> torch.Tensor:
        return torch.cat([self.inputs[(slice(None), slice(None), *self.slices[i])] for i in idx]).to(device)


# ----------------------------------------------------------------------------------- inferer
class EntropyTTAInferer(Inferer):
    """Sliding-window inference with entropy test-time adaptation of the normalisation layers.

    Called like any MONAI inferer, ``inferer(inputs, network)``, also inside evaluators that run
    under ``torch.no_grad()``. Input ``(B, C_in, *spatial)``; each of the B volumes is adapted on
    its own. Output ``(B, C_out, *spatial)`` on ``device``: ``log(P)`` for softmax, ``logit(P)`` for
    sigmoid, where P is the entropy-weighted combination of the K + 1 candidate predictions.

    Args:
        roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval, sw_device, device,
            progress: as in :class:`monai.inferers.SlidingWindowInferer`.
        steps: K, adaptation steps (optimiser steps) per volume; 0 gives plain sliding-window inference.
        lr, momentum: of the default optimiser, ``torch.optim.SGD``.
        optimizer: optional ``params -> torch.optim.Optimizer`` (e.g. a bundle config's
            ``{"_target_": "torch.optim.Adam", "_partial_": true, "lr": 1e-4}``); overrides lr/momentum.
        tau: temperature of the candidate weights ``softmax(-H / tau)``, in mean-entropy units (nats).
        activation: ``"softmax"`` (multi-class) or ``"sigmoid"`` (multi-label, e.g. BraTS TC/WT/ET).
        online: keep adapted parameters and optimiser state from volume to volume (default: episodic,
            the network is restored exactly after every volume). :meth:`reset` restores the source model.
        adapt_fraction: fraction of the windows (evenly spread) that are back-propagated; the others
            only contribute their forward prediction. 1.0 adapts on all windows.
        amp: autocast (float16) with a gradient scaler; default ``None`` = on when the windows run on CUDA.
        fused_attention: run MONAI Swin window attention through ``scaled_dot_product_attention`` during
            ETTA's passes (:func:`fused_window_attention`; same output up to float rounding, no attention
            matrices kept for the backward pass); the network's own forward is back after every volume.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: Sequence[float] | float = 0.25,
        mode: BlendMode | str = BlendMode.CONSTANT,
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: PytorchPadMode | str = PytorchPadMode.CONSTANT,
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        steps: int = 3,
        lr: float = 1e-3,
        momentum: float = 0.9,
        optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        tau: float = 0.01,
        activation: str = "softmax",
        online: bool = False,
        adapt_fraction: float = 1.0,
        amp: bool | None = None,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}.")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}.")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
        if not 0 < adapt_fraction <= 1:
            raise ValueError(f"adapt_fraction must be in (0, 1], got {adapt_fraction}.")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        self.roi_size, self.sw_batch_size, self.overlap = roi_size, int(sw_batch_size), overlap
        self.mode, self.sigma_scale, self.padding_mode, self.cval = BlendMode(mode), sigma_scale, padding_mode, cval
        self.sw_device, self.device, self.progress = sw_device, device, progress
        self.steps, self.lr, self.momentum, self.optimizer = int(steps), lr, momentum, optimizer
        self.tau, self.activation, self.online, self.adapt_fraction, self.amp = tau, activation, online, adapt_fraction, amp
        self.fused_attention = bool(fused_attention)
        self.records: list[dict[str, Any]] = []  # one per volume since the last pop_records()
        self._online: tuple[nn.Module, list[nn.Parameter], torch.optim.Optimizer, list[torch.Tensor], Any] | None = None

    # -------------------------------------------------------------------------- public API
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(network, nn.Module):
            raise TypeError(f"EntropyTTAInferer adapts an nn.Module's norm layers; got {type(network).__name__}.")
        if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            # each rank adapts on its own volume: DDP's gradient all-reduce would pair unrelated windows (or hang)
            network = network.module
        if inputs.ndim < 3:
            raise ValueError(f"inputs must be (B, C, *spatial), got shape {tuple(inputs.shape)}.")
        meta = MetaTensor([]).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else None
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        names = _names(inputs)
        with torch.inference_mode(False):  # also usable under inference_mode (gradients need normal tensors)
            outs = [self._one_volume(x[b : b + 1], network, names[b] if b < len(names) else None, *args, **kwargs) for b in range(x.shape[0])]
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return convert_to_dst_type(out, meta, device=out.device)[0] if meta is not None else out

    def pop_records(self) -> list[dict[str, Any]]:
        """The per-volume records (entropies, weights, time, ...) since the last call, oldest first."""
        records, self.records = self.records, []
        return records

    def reset(self) -> None:
        """Online mode: put the source parameters back and forget the optimiser state."""
        if self._online is not None:
            _, params, _, source, _ = self._online
            with torch.no_grad():
                for p, v in zip(params, source):
                    p.copy_(v)
            self._online = None

    # ------------------------------------------------------------------------- internals
    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer(params)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def _state(self, network: nn.Module, params: list[nn.Parameter], use_amp: bool):
        """(optimiser, grad scaler) for this volume: fresh when episodic, carried over when online."""
        if self.online and self._online is not None and self._online[0] is network:
            return self._online[2], self._online[4]
        opt = self._make_optimizer(params)
        scaler = torch.amp.GradScaler("cuda") if use_amp else None
        if self.online:
            self.reset()
            self._online = (network, params, opt, [p.detach().clone() for p in params], scaler)
        return opt, scaler

    def _one_volume(self, x: torch.Tensor, network: nn.Module, name: str | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else x.device
        device = torch.device(self.device) if self.device is not None else x.device
        use_amp = bool(self.amp if self.amp is not None else sw_device.type == "cuda") and sw_device.type == "cuda"
        plan = _WindowPlan(x, self.roi_size, self.overlap, self.mode, self.sigma_scale, self.padding_mode, self.cval, sw_device, device)
        n_win = len(plan.slices)
        n_adapt = max(1, round(self.adapt_fraction * n_win))
        adapt = set(np.unique(np.linspace(0, n_win - 1, n_adapt).round().astype(int)).tolist())
        mass = float(plan.window_mass[sorted(adapt)].sum())

        params = norm_affine_parameters(network)
        if self.steps > 0 and not params:
            raise ValueError(
                f"{type(network).__name__} has no affine normalisation layer (LayerNorm, GroupNorm, InstanceNorm or "
                "BatchNorm with affine=True): ETTA has nothing to adapt. Use steps=0 or a network with one."
            )
        flags = [(p, p.requires_grad) for p in network.parameters()]
        modes = [(m, m.training) for m in network.modules()]
        source = [p.detach().clone() for p in params] if not self.online else None
        grads = [p.grad for p in params]
        entropies: list[float] = []
        combined, score_max, norm = None, -math.inf, 0.0
        with contextlib.ExitStack() as stack:
            stack.enter_context(fused_window_attention(network, self.fused_attention))
            stack.callback(_restore, network, params, source, grads, flags, modes)
            network.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt, scaler = self._state(network, params, use_amp) if self.steps > 0 else (None, None)
            for k in range(self.steps + 1):
                backprop = k < self.steps
                if backprop:
                    opt.zero_grad(set_to_none=True)
                prob = self._pass(network, plan, adapt if backprop else set(), mass, scaler, sw_device, device, use_amp, *args, **kwargs)
                h = _prob_entropy_mean(prob, self.activation)
                entropies.append(h)
                # running softmax(-H / tau) combination: only two output-sized buffers at any time
                score = -h / self.tau
                new_max = max(score_max, score)
                if combined is None:
                    combined, norm = prob, 1.0
                else:
                    scale = math.exp(score_max - new_max)
                    combined.mul_(scale).add_(prob, alpha=math.exp(score - new_max))
                    norm = norm * scale + math.exp(score - new_max)
                    del prob
                score_max = new_max
                if backprop:
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
        combined.div_(norm)
        h_final = _prob_entropy_mean(combined, self.activation)
        if self.activation == "softmax":
            out = combined.clamp_(min=_EPS).log_()
        else:
            out = combined.clamp_(_EPS, 1.0 - _EPS).logit_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.records.append(
            {
                "name": name,
                "entropy": entropies,
                "entropy_final": h_final,
                "weights": entropy_weights(entropies, self.tau).tolist(),
                "time_s": time.perf_counter() - t0,
                "windows": n_win,
                "adapted_windows": len(adapt) if self.steps else 0,
                "steps": self.steps,
            }
        )
        return out

    def _pass(self, network, plan: _WindowPlan, adapt: set[int], mass: float, scaler, sw_device, device, use_amp, *args, **kwargs) -> torch.Tensor:
        """One sliding-window pass: back-propagate the windows in ``adapt`` one batch at a time and
        return the stitched probability map ``(1, C_out, *spatial)`` on ``device`` (input-sized: the parts of
        windows that lie in the padding of an input smaller than a window are never stored)."""
        out = None
        n_win = len(plan.slices)
        batches, current = [], []
        for i in range(n_win):  # consecutive windows of the same kind (adapted or not), sw_batch_size at most
            if current and (len(current) == self.sw_batch_size or (i in adapt) != (current[0] in adapt)):
                batches.append(current)
                current = []
            current.append(i)
        batches.append(current)
        autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
        it: Iterable = batches
        if self.progress:
            from tqdm import tqdm

            it = tqdm(batches, desc="ETTA pass")
        for idx in it:
            win = plan.window(idx, sw_device)
            grad = idx[0] in adapt
            with torch.set_grad_enabled(grad), autocast:
                logits = network(win, *args, **kwargs)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"EntropyTTAInferer needs a network that returns one tensor, got {type(logits).__name__}.")
            if isinstance(logits, MetaTensor):
                logits = logits.as_tensor()
            if tuple(logits.shape[2:]) != plan.roi:
                raise ValueError(f"network output spatial shape {tuple(logits.shape[2:])} != window {plan.roi}.")
            loss = None
            if grad:
                with torch.enable_grad():
                    lw = torch.cat([plan.weight[(slice(None), slice(None), *plan.slices[i])] for i in idx]).to(sw_device)
                    loss = weighted_entropy_sum(logits, plan.importance * lw, self.activation) / mass
            with torch.no_grad():  # stitch before the backward pass, so the logits are freed before it
                if out is None:
                    out = torch.zeros((1, logits.shape[1], *plan.spatial), dtype=torch.float32, device=device)
                same_device = logits.device == out.device
                weighted = logits.detach().float() if same_device else (logits.detach().float() * plan.importance).to(device)
                for j, i in enumerate(idx):
                    dst, src = plan.parts[i]
                    part = weighted[(slice(j, j + 1), slice(None), *src)]
                    if same_device:  # in place, no window-sized temporary
                        out[(slice(None), slice(None), *dst)].addcmul_(part, plan.importance[(slice(None), slice(None), *src)])
                    else:
                        out[(slice(None), slice(None), *dst)] += part
            del logits, weighted, part
            if loss is not None:
                (scaler.scale(loss) if scaler is not None else loss).backward()
                del loss
        with torch.no_grad():
            out.mul_(plan.weight[(slice(None), slice(None), *plan.crop)])
            if self.activation == "softmax":
                out.sub_(out.amax(dim=1, keepdim=True)).exp_()
                out.div_(out.sum(dim=1, keepdim=True))
            else:
                out.sigmoid_()
        return out


def _restore(network: nn.Module, params, source, grads, flags, modes) -> None:
    """Put back what :meth:`EntropyTTAInferer._one_volume` changed: parameters (episodic), grads, flags, modes."""
    with torch.no_grad():
        if source is not None:
            for p, v in zip(params, source):
                p.copy_(v)
        for p, g in zip(params, grads):
            p.grad = g
    for p, flag in flags:
        p.requires_grad_(flag)
    for m, mode in modes:
        m.training = mode


def _names(inputs: torch.Tensor) -> list[str | None]:
    """Source file names of a batch (from MetaTensor meta), for the per-volume log line."""
    if not isinstance(inputs, MetaTensor):
        return []
    names = inputs.meta.get("filename_or_obj")
    if names is None:
        return []
    names = names if isinstance(names, (list, tuple)) else [names]
    return [str(n) if n is not None else None for n in names]


# ----------------------------------------------------------------------------------- handler
class ETTAStatsHandler:
    """Ignite handler: per-volume ETTA entropies, weights and time into ``engine.state`` and the log.

    At every iteration it takes the records of the ETTA inferer (``inferer``, or ``engine.inferer``
    when not given; a no-op when the engine uses another inferer), appends them to
    ``engine.state.etta`` (a list of dicts) and writes the running means over the epoch into
    ``engine.state.metrics``: ``etta_entropy_before`` (H_0), ``etta_entropy_after`` (H_K),
    ``etta_entropy_final`` (of the combined map), ``etta_weight_0..K``, ``etta_time_s``. MONAI's
    StatsHandler, TensorBoardStatsHandler and MLFlowHandler then record them like any metric.
    Logs one line per volume to ``logger_name``.
    """

    def __init__(self, inferer: EntropyTTAInferer | None = None, logger_name: str = "ETTA") -> None:
        self.inferer = inferer
        self.logger = logging.getLogger(logger_name)

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def epoch_started(self, engine: Engine) -> None:
        engine.state.etta = []
        inferer = self.inferer or getattr(engine, "inferer", None)
        if isinstance(inferer, EntropyTTAInferer):
            inferer.pop_records()  # drop anything recorded outside this engine's run

    def __call__(self, engine: Engine) -> None:
        inferer = self.inferer or getattr(engine, "inferer", None)
        if not isinstance(inferer, EntropyTTAInferer):
            return
        history = getattr(engine.state, "etta", None)
        if history is None:
            history = engine.state.etta = []
        for rec in inferer.pop_records():
            history.append(rec)
            h = rec["entropy"]
            self.logger.info(
                f"ETTA volume {len(history)}{' (' + rec['name'] + ')' if rec['name'] else ''}: "
                f"entropy {h[0]:.4f} -> {h[-1]:.4f} after {rec['steps']} steps, combined {rec['entropy_final']:.4f}, "
                f"weights [{' '.join(f'{w:.3f}' for w in rec['weights'])}], {rec['time_s']:.1f} s"
            )
        if not history:
            return
        metrics = engine.state.metrics
        metrics["etta_entropy_before"] = float(np.mean([r["entropy"][0] for r in history]))
        metrics["etta_entropy_after"] = float(np.mean([r["entropy"][-1] for r in history]))
        metrics["etta_entropy_final"] = float(np.mean([r["entropy_final"] for r in history]))
        metrics["etta_time_s"] = float(np.mean([r["time_s"] for r in history]))
        for k in range(len(history[-1]["weights"])):
            metrics[f"etta_weight_{k}"] = float(np.mean([r["weights"][k] for r in history if len(r["weights"]) > k]))
