"""ETTA's adaptable parameters: the scale and shift of every normalisation layer (``docs/etta.md``, Method, step 1).

Layers that have affine parameters (Swin-UNETR's LayerNorms) adapt those. Layers without (Swin-UNETR's
InstanceNorm3d in encoder1..4, encoder10 and every decoder block) get, for the adaptation only, a
per-channel scale (1) and shift (0) registered as their own ``weight`` / ``bias``, so the layer's
unchanged ``forward`` (``F.instance_norm`` / ``group_norm`` / ``batch_norm`` / ``layer_norm`` with an
affine) computes exactly what it computed without them at step 0, with no extra tensor kept for the
backward pass. :func:`added_norm_affines` removes them again on exit, also after an exception: the
module tree, ``forward`` and state dict are then those of the source model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from custom.attention import patched_forward

__all__ = ["NORM_TYPES", "added_norm_affines", "affineless_norms", "checkpointed_input_blocks", "norm_affine_parameters"]

#: normalisation layers whose affine scale/shift ETTA adapts (BatchNorm and InstanceNorm share _NormBase)
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", None)) if t
)
#: the layers that can take an added affine through their own forward (RMSNorm has no bias)
_ADDABLE = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


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


def affineless_norms(network: nn.Module) -> list[nn.Module]:
    """Normalisation layers of ``network`` with neither scale nor shift (e.g. ``InstanceNorm3d(affine=False)``)."""
    return [
        m
        for m in network.modules()
        if isinstance(m, _ADDABLE) and m._parameters.get("weight", 0) is None and m._parameters.get("bias", 0) is None
    ]


def _affine_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape)
    return (module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features,)


@contextlib.contextmanager
def added_norm_affines(network: nn.Module, params: Sequence[nn.Parameter] | None = None) -> Iterator[list[nn.Parameter]]:
    """Within the block, every affine-less normalisation layer of ``network`` has a scale and a shift.

    Yields the added parameters (scale, shift per layer, in module order): new ones equal to 1 and 0, or
    ``params`` (a list this function yielded before for the same network, e.g. to carry an online
    adaptation over to the next volume). On exit each layer's ``weight`` and ``bias`` are ``None``
    again, also on an exception.
    """
    layers = affineless_norms(network)
    ref = next(iter(network.parameters()), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
    if params is None:
        params = []
        for m in layers:
            shape = _affine_shape(m)
            params += [nn.Parameter(torch.ones(shape, device=device, dtype=dtype)), nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))]
    elif len(params) != 2 * len(layers):
        raise ValueError(f"expected {2 * len(layers)} added parameters for this network, got {len(params)}.")
    try:
        for i, m in enumerate(layers):
            m.weight, m.bias = params[2 * i], params[2 * i + 1]
        yield list(params)
    finally:
        for m in layers:  # the keys stay where they were: _parameters is an ordered dict with weight/bias = None
            m.register_parameter("weight", None)
            m.register_parameter("bias", None)


@contextlib.contextmanager
def checkpointed_input_blocks(network: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the direct children of ``network`` that hold an affine-less norm layer recompute
    their activations in the backward pass when fed by the network's input or by tensors that need no
    gradient; yields how many.

    Such a block (Swin-UNETR's ``encoder1``, fed by the image) had no graph at all before its norm layers
    got adaptable affines; now its full-resolution activations would be kept for the backward pass,
    although that block's backward runs last, when the rest of the graph is already freed. Checkpointing
    it keeps only its input; the recomputation is one forward of that block per adapted window, and the
    result is bit-identical. The network's input may need gradients (ETTA's intensity curve); blocks fed by
    other tensors that need them (the decoder) are left alone. The modules' ``forward`` is put back on
    exit, also on an exception.
    """
    modules = [m for m in network.children() if affineless_norms(m)] if enabled else []
    network_input: list[torch.Tensor] = []

    def remember_input(_module: nn.Module, args: tuple) -> None:
        network_input[:] = [a for a in args if isinstance(a, torch.Tensor)]

    def forward(self: nn.Module, *args, **kwargs):
        class_forward = type(self).forward.__get__(self)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        fed_by_input = all(not t.requires_grad or any(t is i for i in network_input) for t in tensors)
        if torch.is_grad_enabled() and fed_by_input:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(class_forward, *args, use_reentrant=False, **kwargs)
        return class_forward(*args, **kwargs)

    hook = network.register_forward_pre_hook(remember_input) if modules else None
    try:
        with patched_forward(modules, forward) as count:
            yield count
    finally:
        if hook is not None:
            hook.remove()
        network_input.clear()
