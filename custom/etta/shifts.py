"""Graded, reproducible domain shifts of a CT: how ETTA and flip TTA are evaluated (``docs/etta.md``).

A :class:`Shift` names one perturbation (kind, severity, seed); :func:`apply_shift` applies it to an
image windowed to [0, 1], :func:`apply_shift_hu` to an image in Hounsfield units (through the window,
so it can be written as a NIfTI and fed to a bundle). :data:`SHIFTS` is the benchmark's list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Shift", "SHIFTS", "SEVERITIES", "apply_shift", "apply_shift_hu"]

RANDOM_KINDS = ("bias", "noise")
#: severities per kind: gamma exponent; bias-field coefficient range; noise sd (window units); contrast factor; slice factor
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gamma": (0.5, 1.5, 2.0),
    "bias": (0.1, 0.2),
    "noise": (0.05, 0.1),
    "contrast": (0.6, 1.5),
    "thick": (2, 3),
}


@dataclass(frozen=True)
class Shift:
    """One perturbation: ``kind`` in clean | gamma | bias | noise | contrast | thick | mr (mr: a real other modality)."""

    kind: str
    severity: float = 0.0
    seed: int = 0

    @property
    def name(self) -> str:
        if self.kind in ("clean", "mr"):
            return self.kind
        return f"{self.kind}_{self.severity:g}" + (f"_s{self.seed}" if self.kind in RANDOM_KINDS else "")


#: every graded shift, three seeds for the random kinds
SHIFTS: list[Shift] = [Shift(k, s, seed) for k, sev in SEVERITIES.items() for s in sev for seed in ((0, 1, 2) if k in RANDOM_KINDS else (0,))]


def apply_shift(image: torch.Tensor, shift: Shift) -> torch.Tensor:
    """``image`` (C, H, W, D) windowed to [0, 1] under ``shift``, on the same grid (float32).

    gamma: ``x ** g``; bias: MONAI ``RandBiasField`` (degree 3, coefficients uniform in +-severity: a smooth
    multiplicative field of about 0.6-2 at 0.1, 0.35-4 at 0.2); noise: additive
    Gaussian, sd = severity in window units; contrast: ``0.5 + c (x - 0.5)`` clipped to [0, 1]; thick: the
    slices (last axis) averaged in blocks of ``severity`` and interpolated back (slices that many times thicker).
    """
    from monai.transforms import RandBiasField, RandGaussianNoise

    x = torch.as_tensor(image).float()
    if shift.kind in ("clean", "mr"):
        return x
    if shift.kind == "gamma":
        return x.clamp(0, 1) ** shift.severity
    if shift.kind == "contrast":
        return (0.5 + shift.severity * (x - 0.5)).clamp(0, 1)
    if shift.kind == "thick":
        k, depth = int(shift.severity), x.shape[-1]
        pooled = torch.nn.functional.avg_pool1d(x.reshape(-1, 1, depth), k, k, ceil_mode=True, count_include_pad=False)
        return torch.nn.functional.interpolate(pooled, size=depth, mode="linear", align_corners=False).reshape(x.shape)
    if shift.kind == "bias":
        t = RandBiasField(degree=3, coeff_range=(-shift.severity, shift.severity), prob=1.0)
    elif shift.kind == "noise":
        t = RandGaussianNoise(prob=1.0, mean=0.0, std=shift.severity, sample_std=False)
    else:
        raise ValueError(f"unknown shift kind {shift.kind!r}; use one of clean, mr, {', '.join(SEVERITIES)}")
    t.set_random_state(shift.seed)
    return torch.as_tensor(t(x)).float()


def apply_shift_hu(hu: np.ndarray, shift: Shift, window: tuple[float, float]) -> np.ndarray:
    """``hu`` (H, W, D) in Hounsfield units under ``shift`` applied inside ``window`` (values outside clip to its ends)."""
    lo, hi = window
    x = torch.as_tensor(np.clip((hu - lo) / (hi - lo), 0, 1), dtype=torch.float32)[None]
    return (apply_shift(x, shift)[0].numpy() * (hi - lo) + lo).astype(np.float32)
