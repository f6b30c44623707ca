"""ETTA's input intensity curve: a per-channel gamma, scale and shift of the image, adapted with the norms.

Per input channel c, with ``lo_c`` / ``hi_c`` the channel's minimum and maximum over the volume and
``u = (x - lo_c) / (hi_c - lo_c)``::

    curve(x) = x + (hi_c - lo_c) * (exp(s_c) * sign(u) * |u| ** exp(g_c) + b_c - u)

that is ``lo_c + (hi_c - lo_c) * (exp(s_c) * u ** exp(g_c) + b_c)`` on the volume's range, written so that at
``g = s = b = 0`` it returns ``x`` bit for bit (step 0 of ETTA is the source model exactly). It undoes a
global intensity change of the kind a scanner, a reconstruction or a contrast phase brings: a gamma, a
contrast window, an offset; normalisation parameters inside the network cannot (``docs/etta.md``). The
curve is pointwise, so applying it window by window equals applying it to the volume; values outside the
range (a window's padding) follow the same formula (odd power).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IntensityCurve", "intensity_curve"]


def intensity_curve(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, log_gamma: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """The curve of this module's docstring applied to ``x`` (B, C, *spatial).

    ``lo``, ``hi``: the range per channel, (C,), in ``x``'s units; ``log_gamma``, ``log_scale``, ``shift`` (C,):
    the curve's parameters (``shift`` in units of the range). A channel with ``hi == lo`` is returned unchanged.
    Differentiable in the three parameters; returns a tensor of ``x``'s shape and dtype.
    """
    view = (1, -1) + (1,) * (x.ndim - 2)
    lo, hi = lo.reshape(view).to(x.dtype), hi.reshape(view).to(x.dtype)
    width = hi - lo
    u = (x - lo) / torch.where(width > 0, width, torch.ones_like(width))
    mag = u.abs()
    tiny = torch.finfo(u.dtype).tiny  # |u| ** g has no gradient in g at 0: there the power is 0 (and u itself)
    power = torch.where(mag > tiny, torch.sign(u) * mag.clamp(min=tiny) ** log_gamma.exp().reshape(view), u)
    return x + width * (log_scale.exp().reshape(view) * power + shift.reshape(view) - u)


def _channel_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(minimum, maximum) of each channel of ``x`` (B, C, *spatial), float32, each (C,)."""
    flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).float()
    return flat.amin(1), flat.amax(1)


class IntensityCurve(nn.Module):
    """:func:`intensity_curve` with its three parameters per channel, initialised to the identity.

    Args:
        lo, hi: (C,) the range of each input channel over the volume (see :meth:`from_volume`).
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("lo", lo.detach().clone().float())
        self.register_buffer("hi", hi.detach().clone().float())
        channels = self.lo.numel()
        self.log_gamma = nn.Parameter(torch.zeros(channels, device=self.lo.device))
        self.log_scale = nn.Parameter(torch.zeros(channels, device=self.lo.device))
        self.shift = nn.Parameter(torch.zeros(channels, device=self.lo.device))

    @classmethod
    def from_volume(cls, x: torch.Tensor) -> IntensityCurve:
        """An identity curve over the per-channel range of ``x`` (1, C, *spatial)."""
        return cls(*_channel_range(x))

    def set_range(self, x: torch.Tensor) -> None:
        """Take the per-channel range of a new volume ``x`` (1, C, *spatial), keeping the parameters (online mode)."""
        lo, hi = _channel_range(x)
        self.lo.copy_(lo)
        self.hi.copy_(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return intensity_curve(x, self.lo, self.hi, self.log_gamma, self.log_scale, self.shift)

    def values(self) -> dict[str, list[float]]:
        """gamma, scale and shift per channel (for the per-volume record)."""
        return {
            "gamma": [round(v, 4) for v in self.log_gamma.detach().exp().tolist()],
            "scale": [round(v, 4) for v in self.log_scale.detach().exp().tolist()],
            "shift": [round(v, 4) for v in self.shift.detach().tolist()],
        }
