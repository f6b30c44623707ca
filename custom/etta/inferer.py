"""ETTA and flip TTA as MONAI inferers (``docs/etta.md``, Method).

:class:`EntropyTTAInferer` is a drop-in replacement for :class:`monai.inferers.SlidingWindowInferer`.
For every input volume it

1. freezes the network except its normalisation layers' scale and shift: the affines of the layers
   that have them (LayerNorm in Swin-UNETR) and, with ``params="norm"`` (default), a per-channel
   scale (1) and shift (0) added to every layer without (Swin-UNETR's InstanceNorms, see
   :mod:`custom.etta.norms`), so step 0 is the source model exactly; ``params="affine"`` adapts only
   the existing affines; with ``intensity_curve=True`` (default) also a per-channel gamma, scale and
   shift of the input image (:mod:`custom.etta.intensity`, identity at step 0), which undoes global
   intensity changes the network's norms cannot;
2. runs K sliding-window passes; each pass back-propagates the entropy loss (:mod:`custom.etta.entropy`:
   mean entropy, optional confidence margin and class balancing) window by window (gradients
   accumulate, no graph ever spans the stitched volume), stitches that pass's prediction P_k from the
   same forward outputs, and then takes one optimiser step;
3. runs one last forward pass for P_K, and returns ``sum_k w_k P_k`` with ``w = softmax(-H / tau)``
   over k = 0..K (H_k: mean voxel entropy of the stitched P_k; tau absolute or relative to the spread
   of the H_k; optional floor on w_0);
4. restores the network exactly (parameters, added affines removed, ``requires_grad`` flags,
   train/eval mode, ``forward``), also after an exception, unless ``online=True``, which keeps the
   adapted parameters and the optimiser state for the next volume.

Cost: K + 1 forward passes and K backward passes over the windows; memory: one window's graph plus
two output-sized buffers (the current pass and the running weighted combination; three with a floor on
w_0, K + 1 with a relative tau, whose weights are known only at the end), float32 or, with
``buffer_dtype="float16"``, half that. One window's graph
is kept small in two ways. (1) ``fused_attention=True`` (default) runs MONAI's Swin window attention
through ``torch.nn.functional.scaled_dot_product_attention`` during ETTA's passes, with gradients too
(:mod:`custom.attention`): the backward then keeps no ``windows x heads x n x n`` attention
matrices or biases, which were most of the graph. (2) The entropy loss is one autograd function
(:func:`~custom.etta.entropy.weighted_entropy_sum`) whose backward keeps only log P (softmax) or the
logits (sigmoid). (3) The added affines give the block fed by the image (Swin-UNETR's full-resolution
``encoder1``) a graph it did not have, which the intensity curve extends down to the image;
``checkpoint_input_blocks=True`` (default) recomputes its activations in the backward pass instead of
keeping them. Measured with ``benchmarks/etta_cost.py``
(``docs/etta.md``).

:class:`FlipTTAInferer` is the paper's "plain TTA" baseline: the mean of an inner inferer's
probabilities over mirrored copies of the input (left/right label pairs swapped back where a flip
mirrors sided organs).

Both return what the bundles' unchanged post-processing expects from a network: for
``activation="softmax"`` ``log(P)`` (``softmax(log P) == P``, ``argmax`` unchanged), for
``"sigmoid"`` ``logit(P)`` (``sigmoid(logit P) == P``).

Loss: each window contributes its per-voxel entropy times the blending weight of that voxel
(importance map / summed importance), so a full pass minimises the mean over voxels of the
blended window entropies; where windows do not overlap this is exactly the entropy of the stitched
prediction. The recorded H_k are always the exact entropies of the stitched predictions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import BlendMode, PytorchPadMode, convert_to_dst_type
from torch import nn

from custom.attention import fused_window_attention
from custom.checks import source_names
from custom.errors import parse_flag
from custom.etta.entropy import entropy_loss_weights, entropy_weights, prob_entropy_mean, weighted_entropy_sum
from custom.etta.intensity import IntensityCurve
from custom.etta.norms import added_norm_affines, checkpointed_input_blocks, norm_affine_parameters
from custom.etta.windows import WindowPlan
from custom.inferers import float_dtype

__all__ = ["EntropyTTAInferer", "FlipTTAInferer"]

logger = logging.getLogger(__name__)

_EPS = 1e-6  # clamp for log(P) / logit(P) of the returned map
_PARAMS = ("norm", "affine")


def _to_output(prob: torch.Tensor, activation: str) -> torch.Tensor:
    """``log(P)`` (softmax) or ``logit(P)`` (sigmoid), in place: what post-processing turns back into P."""
    if activation == "softmax":
        return prob.clamp_(min=_EPS).log_()
    return prob.clamp_(_EPS, 1.0 - _EPS).logit_()


class _Combination:
    """``sum_k w_k P_k`` over the candidates as they come, with as few output-sized buffers as the weights allow.

    Absolute tau: a running ``softmax(-H / tau)`` sum (one buffer); with a floor on w_0, P_0 is kept
    apart (one more). Relative tau: the weights depend on the spread of all H_k, so all candidates are kept.
    """

    def __init__(self, tau: float, relative: bool, w0_floor: float) -> None:
        self.tau, self.relative, self.w0_floor = tau, relative, w0_floor
        self.entropies: list[float] = []
        self.kept: list[torch.Tensor] = []  # relative tau: every candidate; floor: P_0
        self.running: torch.Tensor | None = None
        self.score_max, self.norm = -math.inf, 0.0

    def add(self, prob: torch.Tensor, h: float) -> None:
        self.entropies.append(h)
        if self.relative or (self.w0_floor > 0 and len(self.entropies) == 1):
            self.kept.append(prob)
            return
        score = -h / self.tau
        new_max = max(self.score_max, score)
        if self.running is None:
            self.running, self.norm = prob, 1.0
        else:
            scale = math.exp(self.score_max - new_max)
            self.running.mul_(scale).add_(prob, alpha=math.exp(score - new_max))
            self.norm = self.norm * scale + math.exp(score - new_max)
        self.score_max = new_max

    def result(self) -> tuple[torch.Tensor, np.ndarray]:
        """(the combined probability map, reusing a candidate's buffer; the weights w_0..w_K)."""
        w = entropy_weights(self.entropies, self.tau, self.relative, self.w0_floor)
        if self.relative:
            out = self.kept[0].mul_(float(w[0]))
            for k in range(1, len(self.kept)):
                out.add_(self.kept[k], alpha=float(w[k]))
            self.kept = []
            return out, w
        out = self.running.div_(self.norm) if self.running is not None else None
        if self.kept:  # floor: P_0 kept apart; running = the softmax(-H / tau) mean of P_1..P_K
            p0 = self.kept.pop()
            out = p0 if out is None else out.mul_(1.0 - float(w[0])).add_(p0, alpha=float(w[0]))
        return out, w


@dataclasses.dataclass
class _OnlineState:
    """What online mode carries from one volume to the next."""

    network: nn.Module
    existing: list[nn.Parameter]  # the network's own norm affines ...
    source: list[torch.Tensor]  # ... and their source values, for reset()
    added: list[nn.Parameter] | None
    curve: IntensityCurve | None
    optimizer: torch.optim.Optimizer
    scaler: Any


@dataclasses.dataclass
class _Passes:
    """What the K + 1 sliding-window passes over one volume share."""

    plan: WindowPlan
    adapt: set[int]  # the windows whose entropy is back-propagated ...
    mass: float  # ... and their summed loss share, which makes the loss a mean over voxels
    use_amp: bool
    scaler: Any  # torch.amp.GradScaler with AMP while adapting, else None


# ----------------------------------------------------------------------------------- ETTA
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
            The defaults (K = 5, Adam lr 1e-3 for the norms and 0.1 for the intensity curve, plain mean entropy,
            tau 0.01, no floor) are the best setting of ``benchmarks/etta_shift.py``'s two sweeps (docs/etta.md).
        optimizer: ``"adam"`` (default: ``torch.optim.Adam(lr)``), ``"sgd"`` (``torch.optim.SGD(lr, momentum)``)
            or a ``param groups -> torch.optim.Optimizer`` (e.g. a bundle config's
            ``{"_target_": "torch.optim.Adam", "_partial_": true, "lr": 1e-4}``), which overrides lr/momentum;
            it receives the norms' group and the intensity curve's (with ``lr=intensity_lr``).
        lr, momentum: of the named optimiser (momentum: SGD only).
        tau: temperature of the candidate weights ``softmax(-H / tau)``, in nats, or with
            ``tau_relative`` in units of the spread ``max_k H_k - min_k H_k``.
        tau_relative: see ``tau``.
        w0_floor: the source prediction P_0 gets at least this weight (0: no floor).
        activation: ``"softmax"`` (multi-class) or ``"sigmoid"`` (multi-label, e.g. BraTS TC/WT/ET).
        params: ``"norm"``: every normalisation layer's scale and shift, added (identity) where a layer
            has none; ``"affine"``: only the existing affine parameters.
        intensity_curve: also adapt a per-channel gamma, scale and shift of the input image over its range
            (:class:`custom.etta.intensity.IntensityCurve`), with its own learning rate ``intensity_lr``
            (a parameter group of the optimiser). On by default: on the held-out patient of
            ``benchmarks/etta_shift.py`` it is what recovers the Dice that intensity shifts cost (docs/etta.md).
        intensity_lr: learning rate of the intensity curve's parameters (log gamma, log scale, shift in units
            of the range).
        margin: confidence margin of the loss: only voxels with entropy below ``margin * log C``
            (sigmoid: elements below ``margin * log 2``) count; None: all voxels.
        balance: balance the loss over predicted classes (:func:`custom.etta.entropy.entropy_loss_weights`), so the
            background's many voxels do not decide the step alone. Off by default: on the held-out patient of
            ``benchmarks/etta_shift.py``'s sweep it lost 0.0053 Dice on clean input (docs/etta.md).
        online: keep adapted parameters and optimiser state from volume to volume (default: episodic,
            the network is restored exactly after every volume). :meth:`reset` restores the source model.
        adapt_fraction: fraction of the windows (evenly spread) that are back-propagated; the others
            only contribute their forward prediction. 1.0 adapts on all windows.
        amp: autocast (float16) with a gradient scaler; default ``None`` = on when the windows run on CUDA.
        fused_attention: run MONAI Swin window attention through ``scaled_dot_product_attention`` during
            ETTA's passes (same output up to float rounding, no attention matrices kept for the backward
            pass); the network's own forward is back after every volume.
        checkpoint_input_blocks: with ``params="norm"``, recompute in the backward pass the activations of
            the network's top-level blocks that have added affines and are fed by the image (Swin-UNETR's
            full-resolution ``encoder1``) instead of keeping them (:func:`custom.etta.norms.checkpointed_input_blocks`).
        buffer_dtype: dtype of the output-sized buffers (the current pass and the running combination;
            ``"float16"`` halves their memory, as the streaming inferer's ``buffer_dtype``); the windows'
            logits, the loss and the entropies are computed in float32 either way.
        record_candidates: also keep every candidate P_k (on the CPU) in the volume's record under
            ``"candidates"``, for evaluations of the weighting (uniform average, best candidate); costs
            K + 1 output-sized CPU buffers, so it is off by default.
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
        steps: int = 5,
        lr: float = 1e-3,
        momentum: float = 0.9,
        optimizer: str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = "adam",
        tau: float = 0.01,
        tau_relative: bool = False,
        w0_floor: float = 0.0,
        activation: str = "softmax",
        params: str = "norm",
        intensity_curve: bool = True,
        intensity_lr: float = 0.1,
        margin: float | None = None,
        balance: bool = False,
        online: bool = False,
        adapt_fraction: float = 1.0,
        amp: bool | None = None,
        fused_attention: bool = True,
        checkpoint_input_blocks: bool = True,
        buffer_dtype: torch.dtype | str = torch.float32,
        record_candidates: bool = False,
    ) -> None:
        super().__init__()
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}.")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}.")
        if not 0 <= w0_floor <= 1:
            raise ValueError(f"w0_floor must be in [0, 1], got {w0_floor}.")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
        if params not in _PARAMS:
            raise ValueError(f"params must be one of {_PARAMS}, got {params!r}.")
        if margin is not None and not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1] (a fraction of log C), got {margin}.")
        if not 0 < adapt_fraction <= 1:
            raise ValueError(f"adapt_fraction must be in (0, 1], got {adapt_fraction}.")
        if not callable(optimizer) and optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'sgd' or a callable, got {optimizer!r}.")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        self.roi_size, self.sw_batch_size, self.overlap = roi_size, int(sw_batch_size), overlap
        self.mode, self.sigma_scale, self.padding_mode, self.cval = BlendMode(mode), sigma_scale, padding_mode, cval
        self.sw_device, self.device, self.progress = sw_device, device, progress
        self.steps, self.lr, self.momentum, self.optimizer = int(steps), lr, momentum, optimizer
        # yes/no options as a bundle command line may give them ("--etta_inferer#balance false" is a string)
        self.tau, self.tau_relative, self.w0_floor = tau, parse_flag(tau_relative, "tau_relative"), float(w0_floor)
        self.activation, self.params, self.margin, self.balance = activation, params, margin, parse_flag(balance, "balance")
        self.intensity_curve, self.intensity_lr = parse_flag(intensity_curve, "intensity_curve"), float(intensity_lr)
        self.online, self.adapt_fraction, self.amp = parse_flag(online, "online"), adapt_fraction, amp
        self.fused_attention = parse_flag(fused_attention, "fused_attention")
        self.checkpoint_input_blocks = parse_flag(checkpoint_input_blocks, "checkpoint_input_blocks")
        self.buffer_dtype = float_dtype(buffer_dtype)
        self.record_candidates = parse_flag(record_candidates, "record_candidates")
        self.records: list[dict[str, Any]] = []  # one per volume since the last pop_records()
        self._online: _OnlineState | None = None

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
        names = source_names(inputs)  # for the per-volume record
        with torch.inference_mode(False):  # also usable under inference_mode (gradients need normal tensors)
            outs = [self._one_volume(x[b : b + 1], network, names[b] if b < len(names) else None, *args, **kwargs) for b in range(x.shape[0])]
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return convert_to_dst_type(out, meta, device=out.device)[0] if meta is not None else out

    def pop_records(self) -> list[dict[str, Any]]:
        """The per-volume records (entropies, weights, time, ...) since the last call, oldest first."""
        records, self.records = self.records, []
        return records

    def reset(self) -> None:
        """Online mode: put the source parameters back and forget the added affines, the intensity curve
        and the optimiser state."""
        if self._online is not None:
            with torch.no_grad():
                for p, v in zip(self._online.existing, self._online.source):
                    p.copy_(v)
            self._online = None

    # ------------------------------------------------------------------------- internals
    def _make_optimizer(self, params: list[nn.Parameter], curve: IntensityCurve | None) -> torch.optim.Optimizer:
        groups = [{"params": params}] if params else []
        if curve is not None:
            groups.append({"params": list(curve.parameters()), "lr": self.intensity_lr})
        if callable(self.optimizer):
            return self.optimizer(groups)
        if self.optimizer == "adam":
            return torch.optim.Adam(groups, lr=self.lr)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)

    def _online_state(self, network: nn.Module) -> _OnlineState | None:
        """Online mode: the carried-over state when it belongs to ``network``, else None (and a reset)."""
        if not self.online:
            return None
        if self._online is not None and self._online.network is network:
            return self._online
        self.reset()
        return None

    def _one_volume(self, x: torch.Tensor, network: nn.Module, name: str | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else x.device
        device = torch.device(self.device) if self.device is not None else x.device
        use_amp = bool(self.amp if self.amp is not None else sw_device.type == "cuda") and sw_device.type == "cuda"
        plan = WindowPlan(x, self.roi_size, self.overlap, self.mode, self.sigma_scale, self.padding_mode, self.cval, sw_device, device)
        adapt, mass = plan.spread(self.adapt_fraction)

        carried = self._online_state(network)
        existing = norm_affine_parameters(network)
        flags = [(p, p.requires_grad) for p in network.parameters()]
        modes = [(m, m.training) for m in network.modules()]
        source = [p.detach().clone() for p in existing] if not self.online else None
        grads = [p.grad for p in existing]
        combination = _Combination(self.tau, self.tau_relative, self.w0_floor)
        candidates: list[torch.Tensor] = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(fused_window_attention(network, self.fused_attention))
            stack.callback(_restore, network, existing, source, grads, flags, modes)
            added: list[nn.Parameter] = []
            if self.params == "norm" and self.steps > 0:
                stack.enter_context(checkpointed_input_blocks(network, self.checkpoint_input_blocks))  # finds the affine-less blocks
                added = stack.enter_context(added_norm_affines(network, carried.added if carried else None))
            params = existing + added
            curve = None
            if self.intensity_curve and self.steps > 0:
                if carried is not None:
                    curve = carried.curve
                    curve.set_range(x)  # the parameters carry over, the range is this volume's
                else:
                    curve = IntensityCurve.from_volume(x).to(sw_device)
            if self.steps > 0 and not params and curve is None:
                raise ValueError(
                    f"{type(network).__name__} has no normalisation layer with a scale and shift to adapt "
                    f"(params={self.params!r}): ETTA has nothing to adapt. Use steps=0, params='norm', intensity_curve=True "
                    "or a network with one."
                )
            network.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt, scaler = None, None
            if self.steps > 0:
                if carried is not None:
                    opt, scaler = carried.optimizer, carried.scaler
                else:
                    opt = self._make_optimizer(params, curve)
                    scaler = torch.amp.GradScaler("cuda") if use_amp else None
                    if self.online:
                        self._online = _OnlineState(network, existing, [p.detach().clone() for p in existing], added, curve, opt, scaler)

            def model(window: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
                return network(curve(window) if curve is not None else window, *a, **kw)

            passes = _Passes(plan, adapt, mass, use_amp, scaler)
            for k in range(self.steps + 1):
                backprop = k < self.steps
                if backprop:
                    opt.zero_grad(set_to_none=True)
                prob = self._pass(model, passes, backprop, *args, **kwargs)
                if self.record_candidates:
                    candidates.append(prob.detach().cpu().clone())
                combination.add(prob, prob_entropy_mean(prob, self.activation))
                del prob
                if backprop:
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
        combined, weights = combination.result()
        h_final = prob_entropy_mean(combined, self.activation)
        out = _to_output(combined, self.activation)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.records.append(
            {
                "name": name,
                "entropy": combination.entropies,
                "entropy_final": h_final,
                "weights": weights.tolist(),
                "time_s": time.perf_counter() - t0,
                "windows": len(plan.slices),
                "adapted_windows": len(adapt) if self.steps else 0,
                "steps": self.steps,
                "adapted_parameters": sum(p.numel() for p in itertools.chain(params, curve.parameters() if curve is not None else ())) if self.steps else 0,
                "intensity_curve": curve.values() if curve is not None else None,
            }
        )
        if self.record_candidates:
            self.records[-1]["candidates"] = candidates
        return out

    def _pass(self, network: Callable[..., torch.Tensor], passes: _Passes, backprop: bool, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One sliding-window pass: with ``backprop``, back-propagate the windows in ``passes.adapt`` one batch
        at a time; return the stitched probability map ``(1, C_out, *spatial)`` on ``plan.device`` (input-sized:
        the parts of windows that lie in the padding of an input smaller than a window are never stored)."""
        plan, mass, scaler, device = passes.plan, passes.mass, passes.scaler, passes.plan.device
        adapt = passes.adapt if backprop else set()
        out = None
        batches = plan.batches(self.sw_batch_size, adapt)
        autocast = torch.autocast("cuda", dtype=torch.float16) if passes.use_amp else contextlib.nullcontext()
        it: Iterable = batches
        if self.progress:
            from tqdm import tqdm

            it = tqdm(batches, desc="ETTA pass")
        for idx in it:
            win = plan.window(idx)
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
                    lw = torch.cat([plan.weight[(slice(None), slice(None), *plan.slices[i])] for i in idx]).to(plan.sw_device)
                    weight = entropy_loss_weights(logits, plan.importance * lw / mass, self.activation, self.margin, self.balance)
                    loss = weighted_entropy_sum(logits, weight, self.activation)
                    del weight
            with torch.no_grad():  # stitch before the backward pass, so the logits are freed before it
                if out is None:
                    out = torch.zeros((1, logits.shape[1], *plan.spatial), dtype=self.buffer_dtype, device=device)
                same_device = logits.device == out.device
                weighted = logits.detach().to(out.dtype) if same_device else (logits.detach().float() * plan.importance).to(device, out.dtype)
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
            out.mul_(plan.weight[(slice(None), slice(None), *plan.crop)].to(out.dtype))  # same dtype: no output-sized temporary
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


# ------------------------------------------------------------------------------ flip TTA
class FlipTTAInferer(Inferer):
    """Plain test-time augmentation: the mean of an inner inferer's probabilities over mirrored inputs.

    For every subset of ``spatial_axes`` (the empty one included: 2^n predictions), the input is
    flipped along those axes, run through ``inferer`` (e.g. a bundle's ``SlidingWindowInferer``),
    turned into probabilities (``activation``) and flipped back; where the subset contains ``lr_axis``
    the channels of each pair in ``lr_pairs`` are swapped back too, since a mirrored left kidney looks
    like a right one. Choose the axes the network was trained to be invariant to (the bundles: their
    training flips). Output ``(B, C, *spatial)``: ``log`` of the mean probability (softmax) or its
    ``logit`` (sigmoid), so the bundles' post-processing is unchanged. Cost: 2^n inner inferences;
    memory: the inner inferer's plus one output-sized sum.

    Args:
        inferer: the inner inferer, called as ``inferer(x, network, *args, **kwargs)``.
        spatial_axes: spatial axes (0 = first spatial axis, R-L in RAS) to mirror along.
        activation: ``"softmax"`` or ``"sigmoid"``.
        lr_pairs: output-channel pairs to swap after a flip along ``lr_axis`` (e.g. ``custom.labels.BTCV_LR_PAIRS``).
        lr_axis: the spatial axis that mirrors left and right.
    """

    def __init__(
        self,
        inferer: Inferer,
        spatial_axes: Sequence[int] = (0, 1, 2),
        activation: str = "softmax",
        lr_pairs: Sequence[Sequence[int]] = (),
        lr_axis: int = 0,
    ) -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
        self.inferer, self.activation, self.lr_axis = inferer, activation, int(lr_axis)
        self.spatial_axes = tuple(sorted({int(a) for a in spatial_axes}))
        self.lr_pairs = tuple((int(a), int(b)) for a, b in lr_pairs)

    def flips(self) -> list[tuple[int, ...]]:
        """The subsets of ``spatial_axes`` that are mirrored, identity first."""
        return [c for r in range(len(self.spatial_axes) + 1) for c in itertools.combinations(self.spatial_axes, r)]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim < 3 or any(not 0 <= a < inputs.ndim - 2 for a in self.spatial_axes):
            raise ValueError(f"spatial_axes {self.spatial_axes} do not fit inputs of shape {tuple(inputs.shape)}.")
        meta = MetaTensor([]).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else None
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        total, flips = None, self.flips()
        for axes in flips:
            dims = [a + 2 for a in axes]
            pred = self.inferer(torch.flip(x, dims) if dims else x, network, *args, **kwargs)
            pred = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
            prob = pred.float().softmax(1) if self.activation == "softmax" else pred.float().sigmoid()
            del pred
            if dims:
                prob = torch.flip(prob, dims)
            if self.lr_axis in axes and self.lr_pairs:
                order = list(range(prob.shape[1]))
                for a, b in self.lr_pairs:
                    order[a], order[b] = b, a
                prob = prob[:, order]
            total = prob if total is None else total.add_(prob)
            del prob
        out = _to_output(total.div_(len(flips)), self.activation)
        return convert_to_dst_type(out, meta, device=out.device)[0] if meta is not None else out
