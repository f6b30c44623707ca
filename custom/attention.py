"""Memory-saving Swin window attention (``fused_window_attention``), for inference and ETTA's passes.

MONAI's own ``use_flash_attention`` acts only while autograd is off and, for shifted windows, still
builds a ``windows x heads x n x n`` bias; this patch runs MONAI's Swin ``WindowAttention`` through
``torch.nn.functional.scaled_dot_product_attention`` with one bias per group of windows that share a
mask, with gradients too. A plain forward keeps no attention matrix (a feature-size-12 SwinUNETR on
four 96^3 windows: 1.4 GB above the weights instead of 4.1 GB on CPU), and an adapted window's
backward keeps none either.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fused_window_attention"]


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
    modules = [m for m in network.modules() if _is_monai_window_attention(m)] if enabled else []
    with patched_forward(modules, _sdpa_window_attention_forward) as count:
        yield count


@contextlib.contextmanager
def patched_forward(modules: Iterable[nn.Module], forward: Callable[..., Any]):
    """Within the block, each of ``modules`` that has no instance ``forward`` of its own runs ``forward``
    (bound to it) instead of its class's; yields how many. Put back on exit, also on an exception."""
    patched = []
    for module in modules:
        if "forward" not in vars(module):
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
