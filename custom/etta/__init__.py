"""ETTA: entropy test-time adaptation, and flip TTA, as MONAI inferers (``docs/etta.md``).

- :mod:`custom.etta.entropy`: entropies, loss options (margin, class balancing), candidate weights;
- :mod:`custom.etta.norms`: the adapted parameters (existing norm affines, added identity affines);
- :mod:`custom.etta.intensity`: the adapted input intensity curve (gamma, scale, shift per channel);
- :mod:`custom.attention`: memory-saving Swin window attention for the backward pass;
- :mod:`custom.etta.windows`: the sliding-window plan (MONAI's geometry);
- :mod:`custom.etta.inferer`: :class:`EntropyTTAInferer`, :class:`FlipTTAInferer`;
- :mod:`custom.etta.handler`: :class:`ETTAStatsHandler`.
"""

from custom.attention import fused_window_attention
from custom.etta.entropy import entropy_loss_weights, entropy_weights, sigmoid_entropy, softmax_entropy, weighted_entropy_sum
from custom.etta.handler import ETTAStatsHandler
from custom.etta.inferer import EntropyTTAInferer, FlipTTAInferer
from custom.etta.intensity import IntensityCurve, intensity_curve
from custom.etta.norms import added_norm_affines, affineless_norms, checkpointed_input_blocks, norm_affine_parameters
from custom.etta.windows import WindowPlan

__all__ = [
    "ETTAStatsHandler",
    "EntropyTTAInferer",
    "FlipTTAInferer",
    "IntensityCurve",
    "WindowPlan",
    "added_norm_affines",
    "affineless_norms",
    "checkpointed_input_blocks",
    "entropy_loss_weights",
    "entropy_weights",
    "fused_window_attention",
    "intensity_curve",
    "norm_affine_parameters",
    "sigmoid_entropy",
    "softmax_entropy",
    "weighted_entropy_sum",
]
