"""ETTA's entropies, loss options and candidate weights (``docs/etta.md``, Method, steps 3-4).

Loss options, for one window of logits ``(B, C, *spatial)`` (each of the B windows on its own), with
H the per-voxel softmax entropy (multi-class) or the per-channel binary entropies h_c (sigmoid,
e.g. BraTS TC/WT/ET, whose voxel entropy is ``sum_c h_c``):

- ``entropy`` (default): the mean over voxels of H;
- ``margin=m``: only confident voxels count, ``mean_v H_v [H_v < m log C]`` (sigmoid: each element
  with ``h_c < m log 2``); the mean is over all voxels, so a window's share of the volume loss does not
  depend on the other windows and window-wise gradients add up exactly;
- ``balance=True``: the mean over predicted classes (argmax; with ``margin``, among the confident
  voxels) of their mean entropy, so that background does not dominate; sigmoid: per channel, the mean
  over its predicted-positive and predicted-negative voxels of their mean h_c, summed over channels.
  Balancing uses the window's own prediction and class sizes (the stitched prediction does not exist
  yet while a pass back-propagates); a volume's loss is the mass-weighted sum over its windows.

Every option is a per-voxel (sigmoid: per-element) weight on the entropy, piecewise constant in the
logits (:func:`entropy_loss_weights`), so the loss is always :func:`weighted_entropy_sum` and its
gradient is the weighted entropy gradient, as autograd gives for the direct formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "entropy_loss_weights",
    "entropy_weights",
    "prob_entropy_mean",
    "sigmoid_entropy",
    "softmax_entropy",
    "weighted_entropy_sum",
]


def softmax_entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Per-voxel entropy (nats) of ``softmax(logits)`` over ``dim``; shape of ``logits`` with ``dim`` kept as 1."""
    logits = logits.float()
    log_p = torch.log_softmax(logits, dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim, keepdim=True)


def _binary_entropies(z: torch.Tensor) -> torch.Tensor:
    """Per-element binary entropy (nats) of ``sigmoid(z)``: ``p softplus(-z) + (1 - p) softplus(z)``, stable for any z."""
    p = torch.sigmoid(z)
    return p * F.softplus(-z) + (1.0 - p) * F.softplus(z)


def sigmoid_entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Per-voxel sum over channels of the binary entropies (nats) of ``sigmoid(logits)``; ``dim`` kept as 1."""
    return _binary_entropies(logits.float()).sum(dim=dim, keepdim=True)


class _WeightedEntropySum(torch.autograd.Function):
    """``sum(H(logits) * weight)`` whose backward keeps one ``C x window`` tensor (log P or the logits).

    Softmax: ``dH/dz_j = -p_j (log p_j + H)``, from the saved ``log p`` and ``H``; sigmoid (binary
    entropies, weight per voxel or per element): ``dh/dz = -z p (1 - p)``, from the saved logits. The
    plain autograd graph of :func:`softmax_entropy` keeps ``log p``, ``p`` and their product instead.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, weight: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.activation = activation
        if activation == "softmax":
            log_p = torch.log_softmax(logits, dim=1)
            h = log_p.exp().mul_(log_p).sum(dim=1, keepdim=True).neg_()
            ctx.save_for_backward(log_p, h, weight)
        else:
            h = _binary_entropies(logits)
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
            grad.mul_(1.0 - grad).mul_(z)  # -dh/dz
        return grad.mul_(weight * -grad_out), None, None


def weighted_entropy_sum(logits: torch.Tensor, weight: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """``(H * weight).sum()`` for ``logits`` (B, C, *spatial), in float32.

    Softmax: H is the per-voxel :func:`softmax_entropy`, ``weight`` broadcastable to ``(B, 1, *spatial)``.
    Sigmoid: H holds the per-element binary entropies, ``weight`` broadcastable to ``(B, C, *spatial)``
    (a ``(B, 1, ...)`` weight gives ``(sigmoid_entropy * weight).sum()``). Same value and gradient as the
    composed functions, with a backward that keeps only log P (softmax) or the logits (sigmoid).
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
    return _WeightedEntropySum.apply(logits.float(), weight.to(torch.float32), activation)


@torch.no_grad()
def entropy_loss_weights(
    logits: torch.Tensor, weight: torch.Tensor, activation: str = "softmax", margin: float | None = None, balance: bool = False
) -> torch.Tensor:
    """Weights that make ``weighted_entropy_sum(logits, w)`` the chosen loss option (module docstring).

    Args:
        logits: ``(B, C, *spatial)``, B windows (each balanced on its own).
        weight: ``(B, 1, *spatial)`` base weight of each voxel (ETTA: blending weight / volume mass; a
            constant ``1 / N`` gives the plain mean over N voxels). Zero where a voxel does not count.
        margin: keep only voxels (sigmoid: elements) whose entropy is below ``margin * log C``
            (sigmoid: ``margin * log 2``); None keeps all.
        balance: weight each predicted class (sigmoid: each channel's predicted state) to the same total.

    Returns:
        ``(B, 1, *spatial)`` (softmax) or ``(B, C, *spatial)`` (sigmoid, when margin or balance is set),
        float32, no gradient. Each window's weights keep the total of its base weights (per channel for
        sigmoid) when ``balance`` is set.
    """
    weight = weight.to(torch.float32)
    if margin is None and not balance:
        return weight
    z = logits.detach().float()
    b, c = z.shape[:2]
    if activation == "softmax":
        h = softmax_entropy(z)
        w = weight * (h < margin * math.log(c)) if margin is not None else weight.expand_as(h).clone()
        if not balance:
            return w
        cls = z.argmax(1, keepdim=True)  # (B, 1, *S)
        mass = torch.zeros(b, c, dtype=torch.float32, device=z.device).scatter_add_(1, cls.flatten(1), w.flatten(1))
    else:
        h = _binary_entropies(z)
        w = weight * (h < margin * math.log(2.0)) if margin is not None else weight.expand_as(h).clone()
        if not balance:
            return w
        # each channel is a two-class problem: group (c, predicted positive?)
        cls = (z > 0).long() + 2 * torch.arange(c, device=z.device).view(1, c, *([1] * (z.ndim - 2)))
        mass = torch.zeros(b, 2 * c, dtype=torch.float32, device=z.device).scatter_add_(1, cls.flatten(1), w.flatten(1))
    present = mass > 0
    groups = present.sum(1, keepdim=True) if activation == "softmax" else present.view(b, c, 2).sum(2).repeat_interleave(2, 1)
    total = weight.flatten(1).sum(1, keepdim=True)  # the window's share of the volume loss (per channel for sigmoid)
    factor = torch.where(present, total / (mass.clamp_min(1e-30) * groups.clamp_min(1)), torch.zeros_like(mass))
    return w * factor.gather(1, cls.flatten(1)).view_as(w)


def prob_entropy_mean(prob: torch.Tensor, activation: str, chunk: int = 8) -> float:
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


def entropy_weights(entropies: Sequence[float], tau: float, relative: bool = False, w0_floor: float = 0.0) -> np.ndarray:
    """Weights of the candidates P_0..P_K: ``softmax(-H / tau)``, sum 1 (tau -> 0 picks the lowest H).

    Args:
        entropies: H_0..H_K, mean voxel entropies (nats).
        tau: temperature in nats, or, with ``relative``, in units of the spread ``max H - min H``
            (equal entropies then give equal weights).
        w0_floor: the source model's weight w_0 is at least this; the other weights shrink in proportion.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}.")
    if not 0 <= w0_floor <= 1:
        raise ValueError(f"w0_floor must be in [0, 1], got {w0_floor}.")
    h = np.asarray(entropies, dtype=np.float64)
    if relative:
        spread = float(h.max() - h.min())
        tau = tau * spread if spread > 0 else math.inf
    s = -h / tau if math.isfinite(tau) else np.zeros_like(h)
    w = np.exp(s - s.max())
    w /= w.sum()
    if w[0] < w0_floor:
        rest = 1.0 - w[0]
        w[1:] *= (1.0 - w0_floor) / rest
        w[0] = w0_floor
    return w
