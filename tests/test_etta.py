"""ETTA (``custom.etta``): entropy test-time adaptation as a MONAI inferer.

Real parts only: a tiny Swin-UNETR (feature_size 12) on a crop of the real sample CT, MONAI's
SlidingWindowInferer and SupervisedEvaluator, torch's own CPU memory accounting. A small conv net
with affine GroupNorm stands in where many passes are needed (exact-gradient, memory, sigmoid and
weighting checks), which also covers the "GroupNorm elsewhere" path.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from custom.etta import (
    EntropyTTAInferer,
    ETTAStatsHandler,
    FlipTTAInferer,
    IntensityCurve,
    added_norm_affines,
    affineless_norms,
    entropy_loss_weights,
    entropy_weights,
    fused_window_attention,
    intensity_curve,
    norm_affine_parameters,
    sigmoid_entropy,
    softmax_entropy,
    weighted_entropy_sum,
)
from custom.labels import BTCV_CT_WINDOW, BTCV_NUM_CLASSES

ROI = (32, 32, 64)  # smallest window a Swin-UNETR accepts (bottleneck needs > 1 voxel)
CROP = (slice(45, 77), slice(35, 67), slice(8, 104))  # 32 x 32 x 96 of the real CT: liver, kidney, vessels


def conv_net(in_ch: int = 1, out_ch: int = 3, hidden: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(in_ch, hidden, 3, padding=1),
        nn.GroupNorm(2, hidden),
        nn.ReLU(),
        nn.Conv3d(hidden, hidden, 3, padding=1),
        nn.GroupNorm(2, hidden),
        nn.ReLU(),
        nn.Conv3d(hidden, out_ch, 1),
    ).eval()


def tiny_swin(out_ch: int, seed: int = 0, depths: tuple[int, ...] = (1, 1, 1, 1)) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=out_ch, feature_size=12, depths=depths, spatial_dims=3).eval()


def window_attentions(net: nn.Module) -> list[nn.Module]:
    from monai.networks.nets.swin_unetr import WindowAttention

    return [m for m in net.modules() if isinstance(m, WindowAttention)]


def shift(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A domain shift: gamma 0.6, a smooth multiplicative bias field (+-20 %), Gaussian noise (sd 0.03)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in x.shape[2:]], indexing="ij")
    field = 1.0 + 0.2 * grid[0] * grid[2]
    return (x.clamp(0, 1) ** 0.6 * field + 0.03 * torch.randn(x.shape, generator=g)).float()


@pytest.fixture(scope="module")
def ct_crop(btcv_sample):
    """Real CT crop windowed to [0, 1] (1, 1, 32, 32, 96) and its 14-class BTCV labels (1, 1, ...)."""
    lo, hi = BTCV_CT_WINDOW
    img = nib.load(btcv_sample / "images" / "ct_abdomen.nii.gz").get_fdata()[CROP]
    lab = nib.load(btcv_sample / "labels" / "ct_abdomen.nii.gz").get_fdata()[CROP]
    x = torch.tensor(np.clip((img - lo) / (hi - lo), 0, 1), dtype=torch.float32)[None, None]
    return x, torch.tensor(lab, dtype=torch.float32)[None, None]


def params_snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def same_state(net: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    sd = net.state_dict()
    return list(sd.keys()) == list(snap.keys()) and all(torch.equal(sd[k], snap[k]) for k in sd)


def module_tree(net: nn.Module) -> list[tuple[str, type, int, bool]]:
    """Every module's name, type, number of own parameters and whether its instance overrides ``forward``."""
    return [(n, type(m), len([p for p in m._parameters.values() if p is not None]), "forward" in vars(m)) for n, m in net.named_modules()]


# ------------------------------------------------------------------------------ pure functions
def test_entropies_of_known_distributions():
    uniform = torch.zeros(1, 5, 2, 2, 2)
    assert torch.allclose(softmax_entropy(uniform), torch.full((1, 1, 2, 2, 2), math.log(5)))
    assert torch.allclose(sigmoid_entropy(torch.zeros(1, 3, 2, 2, 2)), torch.full((1, 1, 2, 2, 2), 3 * math.log(2)))
    confident = torch.tensor([40.0, -40.0, -40.0]).view(1, 3, 1, 1, 1)
    assert softmax_entropy(confident).item() < 1e-12
    assert sigmoid_entropy(confident).item() < 1e-12  # stable for large |logit|


def test_weights_sum_to_one_and_small_tau_picks_lowest_entropy():
    h = [0.52, 0.47, 0.45, 0.46]
    w = entropy_weights(h, tau=0.01)
    assert w.sum() == pytest.approx(1.0)
    assert list(np.argsort(-w)) == [2, 3, 1, 0]  # lower entropy, larger weight
    assert np.allclose(entropy_weights(h, tau=1e-9), [0, 0, 1, 0])
    assert np.allclose(entropy_weights(h, tau=1e9), 0.25)
    with pytest.raises(ValueError):
        entropy_weights(h, tau=0.0)


def test_adapted_parameters_are_the_norm_affines():
    swin = tiny_swin(out_ch=3)
    params = norm_affine_parameters(swin)
    layer_norms = [m for m in swin.modules() if isinstance(m, nn.LayerNorm)]
    # every LayerNorm's weight and bias, and nothing from the non-affine InstanceNorm of the conv blocks
    assert len(params) == 2 * len(layer_norms) > 0
    assert {id(p) for p in params} == {id(p) for m in layer_norms for p in (m.weight, m.bias)}
    assert all(not m.affine for m in swin.modules() if isinstance(m, nn.InstanceNorm3d))
    assert len(norm_affine_parameters(conv_net())) == 4  # two affine GroupNorms


def test_network_without_affine_norm_is_refused():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.Conv3d(4, 2, 1))
    with pytest.raises(ValueError, match="nothing to adapt"):
        EntropyTTAInferer(roi_size=16, steps=1, params="affine", intensity_curve=False)(torch.rand(1, 1, 16, 16, 16), net)
    curve_only = EntropyTTAInferer(roi_size=16, steps=1, params="affine")  # the input's intensity curve is left to adapt
    curve_only(torch.rand(1, 1, 16, 16, 16), net)
    assert curve_only.pop_records()[0]["adapted_parameters"] == 3  # gamma, scale, shift of the one channel
    with pytest.raises(ValueError):
        EntropyTTAInferer(roi_size=16, activation="relu")
    # yes/no options as "python -m monai.bundle run ... --etta_inferer#intensity_curve false" passes them
    assert EntropyTTAInferer(roi_size=16, intensity_curve="false", balance="true").intensity_curve is False
    with pytest.raises(ValueError, match="intensity_curve must be true or false"):
        EntropyTTAInferer(roi_size=16, intensity_curve="sometimes")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_fused_entropy_loss_equals_composed_functions(activation):
    """weighted_entropy_sum: same value and gradient as (entropy(logits) * weight).sum() by autograd."""
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 5, 6, 5, 4, generator=g)).requires_grad_(True)
    weight = torch.rand(2, 1, 6, 5, 4, generator=g)
    entropy = softmax_entropy if activation == "softmax" else sigmoid_entropy
    ref = (entropy(logits) * weight).sum()
    (ref_grad,) = torch.autograd.grad(ref, logits)
    ours = weighted_entropy_sum(logits, weight, activation)
    (grad,) = torch.autograd.grad(ours, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert float(ref_grad.abs().max()) > 1e-2


# --------------------------------------------------------------------------- tiny Swin-UNETR
@pytest.fixture(scope="module")
def swin_run(ct_crop):
    """Adapt a tiny Swin-UNETR on the shifted real CT crop (2 windows, K = 2) under torch.no_grad()."""
    swin = tiny_swin(out_ch=4)
    swin.train()  # a non-default mode, to check that it comes back
    flags = {n: p.requires_grad for n, p in swin.named_parameters()}
    snap, tree = params_snapshot(swin), module_tree(swin)
    # Swin-UNETR damps its LayerNorm affines (InstanceNorm follows every stage), so at random init the
    # default SGD lr moves the entropy only slightly; Adam's per-parameter steps give a clear signal.
    etta = EntropyTTAInferer(ROI, sw_batch_size=2, overlap=0.5, steps=2, optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    x = shift(ct_crop[0])
    with torch.no_grad():
        out = etta(x, swin)
    return {"swin": swin, "flags": flags, "snap": snap, "tree": tree, "out": out, "record": etta.pop_records()[0], "x": x}


def test_swin_entropy_decreases_on_shifted_ct(swin_run):
    rec = swin_run["record"]
    h = rec["entropy"]
    assert len(h) == 3 and rec["windows"] == 2 and rec["adapted_windows"] == 2
    assert h[0] > h[1] + 1e-6 and h[1] > h[2] + 1e-6, h  # each step lowers the stitched entropy
    assert sum(rec["weights"]) == pytest.approx(1.0) and rec["weights"][2] > rec["weights"][0]


def test_swin_state_restored_exactly(swin_run):
    swin = swin_run["swin"]
    assert same_state(swin, swin_run["snap"])  # bit-exact parameters and buffers, same keys in the same order
    assert module_tree(swin) == swin_run["tree"]  # same modules, no added parameter, MONAI's own forward
    assert all(m.weight is None and m.bias is None for m in affineless_norms(swin)) and len(affineless_norms(swin)) > 0
    assert {n: p.requires_grad for n, p in swin.named_parameters()} == swin_run["flags"]
    assert swin.training and all(m.training for m in swin.modules())
    assert all(p.grad is None for p in swin.parameters())


def test_swin_output_is_log_probability_of_the_input_grid(swin_run):
    out, x = swin_run["out"], swin_run["x"]
    assert out.shape == (1, 4, *x.shape[2:])
    assert torch.allclose(out.exp().sum(1), torch.ones(1, *x.shape[2:]), atol=1e-4)  # softmax(log P) == P


# ------------------------------------------------------------------ added affines (params="norm")
def test_added_affines_leave_step_zero_equal_to_the_source(ct_crop):
    """Identity scale/shift on every affine-less InstanceNorm: bit-identical output, all removed afterwards."""
    swin = tiny_swin(out_ch=4)
    x = ct_crop[0][..., :64]
    norms = affineless_norms(swin)
    instance_norms = [m for m in swin.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms == instance_norms and len(norms) >= 20  # encoder1..4, encoder10, every decoder block
    snap, tree = params_snapshot(swin), module_tree(swin)
    with torch.no_grad():
        ref = swin(x)
        with added_norm_affines(swin) as added:
            assert len(added) == 2 * len(norms)
            assert all(m.weight is a and m.bias is b for m, a, b in zip(norms, added[::2], added[1::2]))
            assert all(torch.equal(a, torch.ones(m.num_features)) and torch.equal(b, torch.zeros(m.num_features)) for m, a, b in zip(norms, added[::2], added[1::2]))
            out = swin(x)
            with torch.no_grad():
                added[0].mul_(1.5)  # a changed scale changes the output: the layers really use them
            changed = swin(x)
    assert torch.equal(out, ref)
    assert not torch.allclose(changed, ref, atol=1e-4)
    assert same_state(swin, snap) and module_tree(swin) == tree
    with pytest.raises(RuntimeError, match="inside"):
        with added_norm_affines(swin):
            raise RuntimeError("inside")
    assert same_state(swin, snap) and module_tree(swin) == tree


def test_network_restored_after_an_error_in_a_pass(ct_crop):
    """An exception in the middle of an adapted pass (after a backward) leaves the network as it was."""
    swin = tiny_swin(out_ch=4)
    snap, tree = params_snapshot(swin), module_tree(swin)
    flags = {n: p.requires_grad for n, p in swin.named_parameters()}
    calls = []

    def fail_on_second_window(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("window failed")

    hook = swin.out.register_forward_hook(fail_on_second_window)
    try:
        with pytest.raises(RuntimeError, match="window failed"), torch.no_grad():
            EntropyTTAInferer(ROI, overlap=0.5, steps=2, lr=10.0)(shift(ct_crop[0]), swin)
    finally:
        hook.remove()
    assert same_state(swin, snap) and module_tree(swin) == tree
    assert {n: p.requires_grad for n, p in swin.named_parameters()} == flags
    assert all(p.grad is None for p in swin.parameters())


def test_checkpointed_input_block_same_result_less_memory(ct_crop):
    """encoder1 (fed by the image) recomputes its activations in the backward pass: same entropies and
    output, lower peak, and MONAI's forward back afterwards."""
    swin, x = tiny_swin(out_ch=4), shift(ct_crop[0])[..., :64]
    results, peaks = {}, {}
    for ckpt in (True, False):
        etta = EntropyTTAInferer(ROI, steps=1, lr=1.0, checkpoint_input_blocks=ckpt)
        with torch.no_grad():
            peaks[ckpt] = _peak_cpu_bytes(lambda: results.__setitem__(ckpt, etta(x, swin)))
        results[ckpt] = (results[ckpt], etta.pop_records()[0]["entropy"])
    assert results[True][1] == results[False][1] and results[True][1][1] < results[True][1][0]
    assert torch.equal(results[True][0], results[False][0])
    assert peaks[True] < peaks[False] - 4 * 2**20, peaks  # encoder1: several 12 x 32 x 32 x 64 float maps
    assert all("forward" not in vars(m) for m in swin.modules())


def test_default_adapts_instance_norms_and_affine_option_does_not():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    x = torch.rand(1, 1, 16, 16, 16) * 2
    default = EntropyTTAInferer(16, steps=2, lr=1.0, optimizer="sgd", momentum=0.0)
    with torch.no_grad():
        default(x, net)
    rec = default.pop_records()[0]
    assert rec["adapted_parameters"] == 8 + 3 and rec["entropy"][-1] < rec["entropy"][0] - 1e-4
    assert net[1].weight is None and net[1].bias is None and "weight" in net[1]._parameters


# ------------------------------------------------------------------------------ intensity curve
def test_intensity_curve_is_the_identity_at_start_and_inverts_a_gamma():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 2, 6, 6, 6, generator=g)
    y[0, 0, 0, 0, 0], y[0, 0, -1, -1, -1] = 0.0, 1.0  # channel 0 spans [0, 1]
    y[0, 1] = 3.0  # a constant channel
    curve = IntensityCurve.from_volume(y)
    assert curve.lo.tolist() == [0.0, 3.0] and curve.hi.tolist() == [1.0, 3.0]
    outside = torch.cat([y, torch.full_like(y[..., :1], -0.25)], -1)  # a window's padding below the range
    assert torch.equal(curve(outside), outside)  # bit for bit: step 0 is the source model
    squared = y.clone()
    squared[:, 0] = y[:, 0] ** 2  # a gamma-2 shift of channel 0
    with torch.no_grad():
        curve.log_gamma[0] = math.log(0.5)
    assert torch.allclose(curve(squared)[:, 0], y[:, 0], atol=1e-6) and torch.equal(curve(squared)[:, 1], y[:, 1])
    # scale and shift act on the range: lo + (hi - lo) * (a * u ** g + b)
    x = 10.0 + 40.0 * y[:, :1]  # range [10, 50]
    out = intensity_curve(x, torch.tensor([10.0]), torch.tensor([50.0]), torch.tensor([math.log(2.0)]), torch.tensor([math.log(0.5)]), torch.tensor([0.1]))
    assert torch.allclose(out, 10.0 + 40.0 * (0.5 * y[:, :1] ** 2 + 0.1), atol=1e-5)


def test_intensity_curve_gradient_is_finite_where_the_image_is_at_its_minimum():
    x = torch.linspace(0, 1, 64).reshape(1, 1, 4, 4, 4)  # 0 included: u ** g has no gradient in g there
    curve = IntensityCurve.from_volume(x)
    (curve(x) ** 2).sum().backward()
    grads = [p.grad for p in curve.parameters()]
    assert all(torch.isfinite(gr).all() for gr in grads) and all(float(gr.abs().min()) > 1e-3 for gr in grads)


@pytest.fixture(scope="module")
def trained_swin(ct_crop):
    """A tiny Swin-UNETR trained for a few iterations (DiceCE, AdamW) on the real CT crop (first 64 slices)."""
    from monai.losses import DiceCELoss

    x, y = ct_crop
    swin = tiny_swin(out_ch=BTCV_NUM_CLASSES, depths=(1, 1, 1, 1)).train()
    opt = torch.optim.AdamW(swin.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    for it in range(12):
        s = (0, 32, 16)[it % 3]
        loss = loss_fn(swin(x[..., s : s + 64]), y[..., s : s + 64].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    return swin.eval()


def test_etta_lowers_entropy_of_a_trained_model_on_shifted_ct(trained_swin, ct_crop):
    """With the InstanceNorm affines the entropy moves; with the LayerNorms alone (the old method) it does not."""
    x = shift(ct_crop[0])[..., 16:80]
    drops = {}
    old = {"optimizer": "sgd", "intensity_curve": False, "steps": 3}  # the methods before: norms only, K = 3
    for name, kw in (("default", {}), ("affine", {"params": "affine", **old}), ("old_default", old)):
        etta = EntropyTTAInferer(ROI, **kw)
        with torch.no_grad():
            etta(x, trained_swin)
        h = etta.pop_records()[0]["entropy"]
        drops[name] = h[0] - h[-1]
    print("entropy drop H_0 - H_K:", drops)
    assert drops["affine"] < 1e-5  # LayerNorms only with SGD: a no-op, as measured before
    assert drops["old_default"] > 10 * max(drops["affine"], 1e-7)  # the InstanceNorm affines move it
    assert drops["default"] >= 1e-3  # Adam lr 1e-3, plain mean entropy: the chosen defaults


def test_sham_etta_equals_plain(trained_swin, ct_crop):
    from monai.inferers import SlidingWindowInferer

    x = shift(ct_crop[0])
    kw = dict(roi_size=ROI, overlap=0.5, mode="gaussian")
    sham = EntropyTTAInferer(**kw, steps=3, lr=0.0, intensity_lr=0.0)
    with torch.no_grad():
        p_sham = sham(x, trained_swin).exp()
        p_plain = SlidingWindowInferer(**kw)(x, trained_swin).softmax(1)
    rec = sham.pop_records()[0]
    assert np.allclose(rec["weights"], 0.25) and len(set(rec["entropy"])) == 1
    assert torch.allclose(p_sham, p_plain, atol=1e-5)


def test_intensity_curve_undoes_a_gamma_shift_and_carries_over_online(trained_swin, ct_crop):
    """On a gamma-2 copy of the CT the curve alone (the norms frozen: lr 0) moves gamma below 1 and lowers the
    entropy; online, the curve's parameters carry over to the next volume and reset() forgets them."""
    x = ct_crop[0][..., 16:80] ** 2
    etta = EntropyTTAInferer(ROI, lr=0.0, online=True)
    with torch.no_grad():
        etta(x, trained_swin)
        first = etta.pop_records()[0]
        etta(x, trained_swin)
        second = etta.pop_records()[0]
    print("gamma-2 input, curve alone: entropy", first["entropy"], "curve", first["intensity_curve"])
    assert first["intensity_curve"]["gamma"][0] < 0.9 and first["entropy"][-1] < first["entropy"][0] - 1e-3
    assert second["entropy"][0] < first["entropy"][0] - 1e-3  # the second volume starts from the adapted curve
    etta.reset()
    with torch.no_grad():
        etta(x, trained_swin)
    assert etta.pop_records()[0]["entropy"][0] == first["entropy"][0]  # the source model again


# -------------------------------------------------------------------------------- loss options
def direct_loss(logits: torch.Tensor, activation: str, margin: float | None, balance: bool) -> torch.Tensor:
    """The loss options written out for one window (B = 1), with plain autograd ops."""
    c = logits.shape[1]
    if activation == "softmax":
        h = softmax_entropy(logits)[:, 0]  # (1, *S)
        keep = h < margin * math.log(c) if margin is not None else torch.ones_like(h, dtype=torch.bool)
        if not balance:
            return (h * keep).sum() / h.numel()
        pred = logits.argmax(1)
        means = [h[(pred == k) & keep].mean() for k in range(c) if ((pred == k) & keep).any()]
        return torch.stack(means).mean() if means else (logits * 0).sum()
    p = torch.sigmoid(logits)
    h = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))  # (1, C, *S)
    keep = h < margin * math.log(2) if margin is not None else torch.ones_like(h, dtype=torch.bool)
    if not balance:
        return (h * keep).sum() / h[:, 0].numel()
    total = 0.0
    for ch in range(c):
        hc, kc, pos = h[:, ch], keep[:, ch], logits[:, ch] > 0
        groups = [hc[g & kc].mean() for g in (pos, ~pos) if (g & kc).any()]
        total = total + (torch.stack(groups).mean() if groups else 0.0)  # a channel with no confident element adds nothing
    return total


OPTIONS = [(None, False), (0.8, False), (None, True), (0.8, True)]


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("margin,balance", OPTIONS)
def test_loss_option_value_and_gradient(activation, margin, balance):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(1, 4, 6, 5, 4, generator=g)).requires_grad_(True)
    ref = direct_loss(logits, activation, margin, balance)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    weight = torch.full((1, 1, 6, 5, 4), 1.0 / 120)
    ours = weighted_entropy_sum(logits, entropy_loss_weights(logits, weight, activation, margin, balance), activation)
    (grad,) = torch.autograd.grad(ours, logits)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert float(ref_grad.abs().max()) > 1e-3
    if margin is not None:  # the margin really drops voxels
        assert float(ours) < float(direct_loss(logits, activation, None, balance)) - 1e-3


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("margin,balance", OPTIONS[1:])
def test_loss_option_windowwise_gradient(activation, margin, balance):
    """Through the inferer: four non-overlapping windows; the SGD step (lr 1) is the gradient of the
    direct loss: the volume mean for the margin, the mean of the windows' losses when balanced."""
    net = conv_net(out_ch=3, seed=4)
    x = torch.rand(1, 1, 32, 32, 16) * 3
    before = [p.detach().clone() for p in norm_affine_parameters(net)]
    etta = EntropyTTAInferer(16, overlap=0.0, steps=1, optimizer="sgd", momentum=0.0, lr=1.0, online=True, activation=activation, margin=margin, balance=balance)
    with torch.no_grad():
        etta(x, net)
    step = [b - p.detach() for b, p in zip(before, norm_affine_parameters(net))]
    etta.reset()
    adapted = {id(p) for p in norm_affine_parameters(net)}
    for p in net.parameters():
        p.requires_grad_(id(p) in adapted)
    tiles = [net(x[..., i : i + 16, j : j + 16, :]) for i in (0, 16) for j in (0, 16)]
    if balance:
        loss = sum(direct_loss(t, activation, margin, True) for t in tiles) / 4
    else:
        loss = direct_loss(torch.cat(tiles, dim=-1), activation, margin, False)
    loss.backward()
    ref = [p.grad for p in norm_affine_parameters(net)]
    assert max(float(r.abs().max()) for r in ref) > 1e-5
    assert all(torch.allclose(s, r, rtol=1e-3, atol=1e-7) for s, r in zip(step, ref))


# ---------------------------------------------------------------------------------- combination
def test_relative_tau_and_floor_on_w0():
    h = [0.50, 0.40, 0.45]
    w = entropy_weights(h, tau=0.5, relative=True)  # tau = 0.5 x spread 0.1 = 0.05 nats
    assert np.allclose(w, entropy_weights(h, tau=0.05))
    assert np.allclose(entropy_weights([0.3, 0.3], tau=0.1, relative=True), 0.5)  # no spread: uniform
    floored = entropy_weights(h, tau=0.01, w0_floor=0.5)
    free = entropy_weights(h, tau=0.01)
    assert floored[0] == pytest.approx(0.5) and free[0] < 0.01
    assert np.allclose(floored[1:] / floored[1:].sum(), free[1:] / free[1:].sum()) and floored.sum() == pytest.approx(1.0)
    assert np.allclose(entropy_weights(h, tau=1e9, w0_floor=0.1), 1 / 3)  # above the floor: unchanged


@pytest.mark.parametrize("kw", [{"tau": 0.05, "tau_relative": True}, {"tau": 0.01, "w0_floor": 0.4}, {"tau": 1e-9, "tau_relative": True, "w0_floor": 1.0}])
def test_combination_is_the_weighted_sum_of_the_candidates(kw):
    """Candidates P_0..P_2 from online runs with 0, 1, 2 steps; ETTA's output is sum_k w_k P_k with the recorded weights."""
    net, x = conv_net(out_ch=3, seed=1), torch.rand(1, 1, 24, 24, 24) * 3
    base = dict(roi_size=16, overlap=0.5, lr=0.5, intensity_curve=False)  # the candidates come from the network alone
    candidates = []
    for k in range(3):
        online = EntropyTTAInferer(**base, steps=k, online=True, tau=1e9)
        with torch.no_grad():
            online(x, net)
            candidates.append(EntropyTTAInferer(16, overlap=0.5, steps=0)(x, net).exp())
        online.reset()
    etta = EntropyTTAInferer(**base, steps=2, record_candidates=True, **kw)
    with torch.no_grad():
        out = etta(x, net).exp()
    rec = etta.pop_records()[0]
    w = rec["weights"]
    assert len(rec["candidates"]) == 3 and all(torch.allclose(c, p, atol=1e-5) for c, p in zip(rec["candidates"], candidates))
    assert np.allclose(w, entropy_weights(rec["entropy"], kw["tau"], kw.get("tau_relative", False), kw.get("w0_floor", 0.0)))
    assert w[0] >= kw.get("w0_floor", 0.0) - 1e-12
    assert torch.allclose(out, sum(wk * p for wk, p in zip(w, candidates)), atol=1e-5)


# ------------------------------------------------------------------------------------ flip TTA
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_flip_tta_is_the_mean_of_the_flipped_predictions(activation):
    from monai.inferers import SlidingWindowInferer

    net, x = conv_net(out_ch=4, seed=5), torch.rand(1, 1, 20, 24, 28) * 2
    inner = SlidingWindowInferer(16, overlap=0.25)
    act = (lambda t: t.softmax(1)) if activation == "softmax" else (lambda t: t.sigmoid())
    tta = FlipTTAInferer(inner, spatial_axes=(0, 1, 2), activation=activation)
    assert len(tta.flips()) == 8 and tta.flips()[0] == ()
    with torch.no_grad():
        out = tta(x, net)
        preds = [act(inner(torch.flip(x, [a + 2 for a in f]), net)).flip([a + 2 for a in f]) for f in tta.flips()]
        plain = act(inner(x, net))
    mean = torch.stack(preds).mean(0)
    p = out.exp() if activation == "softmax" else out.sigmoid()
    assert torch.allclose(p, mean, atol=1e-5)
    assert float((mean - plain).abs().max()) > 1e-3  # the flips do change the prediction


def test_flip_tta_swaps_left_right_pairs_back():
    from monai.inferers import SlidingWindowInferer

    net, x = conv_net(out_ch=4, seed=6), torch.rand(1, 1, 16, 16, 16)
    inner = SlidingWindowInferer(16)
    tta = FlipTTAInferer(inner, spatial_axes=(0,), lr_pairs=((1, 2),))
    with torch.no_grad():
        p = tta(x, net).exp()
        flipped = inner(x.flip(2), net).softmax(1).flip(2)[:, [0, 2, 1, 3]]
        ref = (inner(x, net).softmax(1) + flipped) / 2
    assert torch.allclose(p, ref, atol=1e-5)
    with pytest.raises(ValueError, match="spatial_axes"):
        FlipTTAInferer(inner, spatial_axes=(3,))(x, net)


# ---------------------------------------------------------------- memory-saving window attention
@pytest.fixture(scope="module")
def swin_shifted():
    """A tiny Swin-UNETR with two blocks in its first stage, so a shifted-window mask is used."""
    return tiny_swin(out_ch=4, seed=3, depths=(2, 1, 1, 1))


def test_fused_attention_same_output_and_gradient(swin_shifted, ct_crop):
    swin, x = swin_shifted, shift(ct_crop[0])[..., :64]
    params = norm_affine_parameters(swin)

    def run():
        for p in swin.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.no_grad():
            out = swin(x)
        softmax_entropy(swin(x)).mean().backward()
        grads = [p.grad.clone() for p in params]
        for p in swin.parameters():
            p.requires_grad_(True)
            p.grad = None
        return out, grads

    ref_out, ref_grads = run()
    with fused_window_attention(swin) as n:
        assert n == len(window_attentions(swin)) == 5
        assert all("forward" in vars(m) for m in window_attentions(swin))
        out, grads = run()
    assert all("forward" not in vars(m) for m in window_attentions(swin))  # MONAI's forward is back
    assert torch.allclose(out, ref_out, atol=1e-5)
    scale = max(float(g.abs().max()) for g in ref_grads)
    assert scale > 1e-6
    assert all(torch.allclose(g, r, atol=1e-4 * scale) for g, r in zip(grads, ref_grads))


def test_fused_attention_restored_after_a_volume_and_after_an_error(swin_shifted, ct_crop):
    swin, x = swin_shifted, ct_crop[0][..., :64]
    seen = []
    hook = window_attentions(swin)[1].register_forward_hook(lambda m, a, o: seen.append("forward" in vars(m)))
    try:
        with torch.no_grad():
            EntropyTTAInferer(ROI, steps=1)(x, swin)
        assert seen and all(seen)  # every ETTA pass ran the fused attention ...
        assert all("forward" not in vars(m) for m in window_attentions(swin))  # ... and the switch is undone
        seen.clear()
        with torch.no_grad():
            EntropyTTAInferer(ROI, steps=1, fused_attention=False)(x, swin)
        assert seen and not any(seen)

        def failing_optimizer(params):
            raise RuntimeError("optimizer failed")

        flags = {n: p.requires_grad for n, p in swin.named_parameters()}
        with pytest.raises(RuntimeError, match="optimizer failed"):
            EntropyTTAInferer(ROI, steps=1, optimizer=failing_optimizer)(x, swin)
        assert all("forward" not in vars(m) for m in window_attentions(swin))
        assert {n: p.requires_grad for n, p in swin.named_parameters()} == flags
    finally:
        hook.remove()


def test_fused_attention_etta_output_equals_default_attention(swin_shifted, ct_crop):
    swin, x = swin_shifted, shift(ct_crop[0])[..., 16:80]  # one window
    # SGD (a step linear in the gradient); a large lr because a random-init Swin-UNETR damps its LayerNorms
    kw = dict(roi_size=ROI, steps=1, lr=1e3, optimizer="sgd", momentum=0.0, params="affine", balance=False)  # LayerNorms only: the attention is what differs
    fused, default = EntropyTTAInferer(**kw), EntropyTTAInferer(**kw, fused_attention=False)
    with torch.no_grad():
        p_fused, p_default = fused(x, swin).exp(), default(x, swin).exp()
        p_source = EntropyTTAInferer(**{**kw, "steps": 0})(x, swin).exp()
    h_fused, h_default = fused.pop_records()[0]["entropy"], default.pop_records()[0]["entropy"]
    assert h_default[1] < h_default[0]
    assert float((p_default - p_source).abs().max()) > 1e-3  # the adaptation changed the prediction ...
    assert np.allclose(h_fused, h_default, rtol=1e-6, atol=0), (h_fused, h_default)
    assert torch.allclose(p_fused, p_default, atol=2e-5)  # ... the same way with either attention


def test_fused_attention_lowers_etta_peak_memory(swin_shifted):
    """The backward keeps no windows x heads x n x n attention matrices: a much lower peak for one window."""
    x = torch.rand(1, 1, *ROI)
    peaks = {}
    for fused in (False, True):
        etta = EntropyTTAInferer(ROI, steps=1, fused_attention=fused)
        with torch.no_grad():
            peaks[fused] = _peak_cpu_bytes(lambda: etta(x, swin_shifted))
    assert peaks[True] < 0.7 * peaks[False], peaks
    print(f"ETTA peak with fused / default attention: {peaks[True] / 2**20:.0f} / {peaks[False] / 2**20:.0f} MB")


# ------------------------------------------------------------------------ exactness and pathways
def test_zero_steps_equals_monai_sliding_window():
    from monai.inferers import SlidingWindowInferer

    net = conv_net(out_ch=3)
    x = torch.rand(1, 1, 40, 28, 20)  # smaller than the roi on the last axis: padding path
    args = dict(roi_size=(24, 24, 24), sw_batch_size=3, overlap=0.5, mode="gaussian")
    with torch.no_grad():
        ref = SlidingWindowInferer(**args)(x, net).softmax(1)
        ours = EntropyTTAInferer(steps=0, **args)(x, net).softmax(1)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_windowwise_gradient_equals_whole_volume_gradient():
    """Accumulating window by window gives the exact gradient of the volume's mean entropy."""
    net = conv_net(out_ch=3)
    x = torch.rand(1, 1, 32, 32, 16)  # four non-overlapping 16^3 windows tile it exactly
    before = [p.detach().clone() for p in norm_affine_parameters(net)]
    etta = EntropyTTAInferer(16, sw_batch_size=1, overlap=0.0, steps=1, optimizer="sgd", momentum=0.0, lr=1.0, online=True, balance=False)
    with torch.no_grad():
        etta(x, net)
    step = [b - p.detach() for b, p in zip(before, norm_affine_parameters(net))]  # = lr * gradient
    etta.reset()
    assert all(torch.equal(b, p) for b, p in zip(before, norm_affine_parameters(net)))
    # reference: one graph over the whole volume
    adapted = {id(p) for p in norm_affine_parameters(net)}
    for p in net.parameters():
        p.requires_grad_(id(p) in adapted)
    tiles = torch.cat([x[..., i : i + 16, j : j + 16, :] for i in (0, 16) for j in (0, 16)])
    softmax_entropy(net(tiles)).mean().backward()
    ref = [p.grad for p in norm_affine_parameters(net)]
    assert all(torch.allclose(s, r, rtol=1e-4, atol=1e-7) for s, r in zip(step, ref))
    assert max(float(r.abs().max()) for r in ref) > 1e-4  # a real gradient, not zeros on both sides


def test_online_keeps_adaptation_and_tiny_tau_returns_lowest_entropy_candidate():
    from monai.inferers import SlidingWindowInferer

    net, x = conv_net(out_ch=3, seed=1), torch.rand(1, 1, 24, 24, 24) * 3
    kw = dict(roi_size=16, overlap=0.5, steps=2, lr=0.5, intensity_curve=False)  # the adapted state is in the network alone
    episodic = EntropyTTAInferer(tau=1e-9, **kw)
    with torch.no_grad():
        picked = episodic(x, net).exp()
    h = episodic.pop_records()[0]["entropy"]
    assert int(np.argmin(h)) == 2, h  # on this input the last candidate is the most confident
    online = EntropyTTAInferer(**kw, online=True)  # keeps the parameters after K steps ...
    with torch.no_grad():
        online(x, net)
        p_last = SlidingWindowInferer(16, overlap=0.5)(x, net).softmax(1)  # ... so this is P_K
    assert torch.allclose(picked, p_last, atol=1e-5)
    online.reset()  # back to the source model: P_0 again
    with torch.no_grad():
        p_source = SlidingWindowInferer(16, overlap=0.5)(x, net).softmax(1)
    assert not torch.allclose(p_source, p_last, atol=1e-3)
    assert torch.allclose(p_source, EntropyTTAInferer(16, overlap=0.5, steps=0)(x, net).exp(), atol=1e-5)


def test_sigmoid_path_brats_style():
    """Three sigmoid channels (TC/WT/ET-like) from four contrasts: summed binary entropy, logit output."""
    from monai.inferers import SlidingWindowInferer

    net, x = conv_net(in_ch=4, out_ch=3, seed=2), torch.rand(1, 4, 24, 24, 24) * 2
    kw = dict(roi_size=16, overlap=0.5, activation="sigmoid")
    etta = EntropyTTAInferer(steps=3, lr=0.5, **kw)
    with torch.no_grad():
        out = etta(x, net)
        plain = SlidingWindowInferer(16, overlap=0.5)(x, net).sigmoid()
    rec = etta.pop_records()[0]
    assert rec["entropy"][0] == pytest.approx(float(sigmoid_entropy(plain.logit()).mean()), rel=1e-5)
    assert rec["entropy"][-1] < rec["entropy"][0] - 1e-3
    p = out.sigmoid()
    assert out.shape == (1, 3, 24, 24, 24) and 0 < float(p.min()) and float(p.max()) < 1
    w = torch.tensor(rec["weights"])
    assert float(w.sum()) == pytest.approx(1.0) and int(w.argmax()) == int(np.argmin(rec["entropy"]))


def test_adapt_fraction_backpropagates_a_subset_of_windows():
    net, x = conv_net(), torch.rand(1, 1, 32, 32, 32)
    etta = EntropyTTAInferer(16, overlap=0.5, steps=1, lr=0.5, adapt_fraction=0.25)
    with torch.no_grad():
        etta(x, net)
    rec = etta.pop_records()[0]
    assert rec["windows"] == 27 and rec["adapted_windows"] == 7
    assert rec["entropy"][1] < rec["entropy"][0]


# ---------------------------------------------------------------------------------- memory
def _peak_cpu_bytes(fn) -> int:
    """Peak of torch's CPU allocations (bytes above the level at the start) while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def test_peak_memory_grows_far_less_than_volume():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.Conv3d(32, 2, 1)).eval()
    etta = EntropyTTAInferer(32, overlap=0.0, steps=1)

    def run_etta(shape):
        x = torch.rand(shape)
        return _peak_cpu_bytes(lambda: etta(x, net))

    def whole_graph(shape):  # what ETTA must not do: one graph over the whole volume
        x = torch.rand(shape)
        return _peak_cpu_bytes(lambda: softmax_entropy(net(x)).mean().backward())

    small, large = (1, 1, 64, 64, 64), (1, 1, 128, 128, 64)
    with torch.no_grad():
        etta_ratio = run_etta(large) / run_etta(small)
    naive_ratio = whole_graph(large) / whole_graph(small)
    assert naive_ratio > 3.5  # the measurement sees volume-sized graphs
    assert etta_ratio < 2.0, etta_ratio
    print(f"peak memory ratio 4x volume / 1x: ETTA {etta_ratio:.2f}, whole-volume graph {naive_ratio:.2f}")


def test_float16_buffers_halve_the_output_sized_memory_same_labels():
    net, x = conv_net(out_ch=32, seed=2), torch.rand(1, 1, 64, 64, 64) * 3
    runs = {}
    for dtype in ("float32", "float16"):
        etta = EntropyTTAInferer(32, overlap=0.0, steps=1, buffer_dtype=dtype)
        with torch.no_grad():
            peak = _peak_cpu_bytes(lambda: runs.setdefault(dtype, etta(x, net)))
        runs[dtype + "_peak"] = peak
        runs[dtype + "_h"] = etta.pop_records()[0]["entropy"]
    buffer = 32 * 64**3 * 4  # one float32 output-sized map
    assert runs["float16"].dtype == torch.float16
    assert runs["float32_peak"] - runs["float16_peak"] > 0.9 * buffer  # two buffers at half size
    p32, pick16 = runs["float32"].exp(), runs["float16"].argmax(1, keepdim=True)
    gap = p32.amax(1, keepdim=True) - p32.gather(1, pick16)  # 0 where float16 picks float32's class
    assert (gap == 0).float().mean() > 0.99 and gap.max() < 5e-3  # only near-ties of a random net flip
    assert np.allclose(runs["float16_h"], runs["float32_h"], atol=2e-3)


# ------------------------------------------------------------------------------ evaluator
def test_inside_supervised_evaluator_with_stats_handler(ct_crop, caplog):
    from monai.data import DataLoader, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    x, y = ct_crop
    affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0]))
    data = [
        {"image": MetaTensor(v[0, :, :, :, :64], affine=affine, meta={"filename_or_obj": name}), "label": MetaTensor(y[0, :, :, :, :64], affine=affine)}
        for v, name in ((x, "ct.nii.gz"), (shift(x), "ct_shifted.nii.gz"))
    ]
    swin = tiny_swin(out_ch=BTCV_NUM_CLASSES)
    snap = params_snapshot(swin)
    etta = EntropyTTAInferer(ROI, steps=1, optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    post = Compose([Activationsd("pred", softmax=True), AsDiscreted(("pred", "label"), argmax=(True, False), to_onehot=BTCV_NUM_CLASSES)])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=1),
        network=swin,
        inferer=etta,
        postprocessing=post,
        key_val_metric={"val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[ETTAStatsHandler()],
    )
    with caplog.at_level(logging.INFO, logger="ETTA"):
        evaluator.run()
    m = evaluator.state.metrics
    assert len(evaluator.state.etta) == 2
    assert m["etta_entropy_after"] < m["etta_entropy_before"]
    assert m["etta_weight_0"] + m["etta_weight_1"] == pytest.approx(1.0)
    assert 0.0 <= m["val_mean_dice"] <= 1.0
    lines = [r.getMessage() for r in caplog.records if r.name == "ETTA"]
    assert len(lines) == 2 and "ct_shifted.nii.gz" in lines[1] and "->" in lines[1] and "intensity curve gamma [" in lines[1]
    assert same_state(swin, snap)


# ----------------------------------------------------------------------------------- bundles
BUNDLE_DIRS = sorted(p.parents[1] for p in (Path(__file__).resolve().parents[1] / "bundles").glob("*/configs/inference.json"))


def _parsed(bundle: Path, files: list[str], use_etta: bool | None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in files])
    parser["bundle_root"] = str(bundle)
    if use_etta is not None:
        parser["use_etta"] = use_etta
    return parser


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_bundle_chooses_etta_by_flag(bundle):
    """inference.json and train.json + evaluate.json: ``use_etta`` (default false) picks the inferer."""
    from monai.inferers import SlidingWindowInferer

    from custom.inferers import StreamingSlidingWindowInferer

    post = _parsed(bundle, ["inference.json"], None)["postprocessing"]["transforms"]
    activation = next(t for t in post if t["_target_"] == "custom.transforms.LogitsToLabelsd")["activation"]
    for files, inferer_id, handlers_id in (
        (["inference.json"], "inferer", "handlers"),
        (["train.json", "evaluate.json"], "validate#evaluator#inferer", "validate#handlers"),
    ):
        default = _parsed(bundle, files, None)
        assert default["use_etta"] is False
        plain = default.get_parsed_content(inferer_id)
        etta_parser = _parsed(bundle, files, True)
        etta = etta_parser.get_parsed_content(inferer_id)
        # inference decides labels slab by slab; evaluation keeps MONAI's stitched scores for its metrics
        assert type(plain) is (StreamingSlidingWindowInferer if inferer_id == "inferer" else SlidingWindowInferer), files
        assert isinstance(etta, EntropyTTAInferer), files
        assert list(etta.roi_size) == list(plain.roi_size) and etta.overlap == plain.overlap
        assert etta.sw_batch_size == plain.sw_batch_size and etta.mode == plain.mode
        assert (etta.steps, etta.optimizer, etta.lr, etta.balance, etta.tau, etta.activation) == (5, "adam", 1e-3, False, 0.01, activation)
        assert (etta.intensity_curve, etta.intensity_lr) == (True, 0.1)
        assert any(h["_target_"] == "custom.etta.ETTAStatsHandler" for h in default[handlers_id])
        assert default.get_parsed_content("output_dir") != etta_parser.get_parsed_content("output_dir")
        tta_parser = _parsed(bundle, files, None)
        tta_parser["use_tta"] = True
        tta = tta_parser.get_parsed_content(inferer_id)
        assert default["use_tta"] is False and isinstance(tta, FlipTTAInferer) and tta.activation == activation
        assert type(tta.inferer) is SlidingWindowInferer and list(tta.inferer.roi_size) == list(plain.roi_size)
        assert tta_parser.get_parsed_content("output_dir").endswith("/eval_tta")
        assert etta_parser.get_parsed_content("output_dir").endswith("/eval_etta")
        for word, expected in (("false", type(plain)), ("True", EntropyTTAInferer)):  # as `--use_etta WORD` passes it
            assert type(_parsed(bundle, files, word).get_parsed_content(inferer_id)) is expected, (files, word)


# ------------------------------------------------------------------------------ graded shifts
def test_shifts_are_the_documented_perturbations(ct_crop):
    from custom.etta.shifts import SHIFTS, Shift, apply_shift, apply_shift_hu

    x = ct_crop[0][0]  # (1, 32, 32, 96) in [0, 1]
    assert len(SHIFTS) == 3 + 2 * 3 + 2 * 3 + 2 + 2 and len({s.name for s in SHIFTS}) == len(SHIFTS)
    assert torch.equal(apply_shift(x, Shift("clean")), x)
    assert torch.allclose(apply_shift(x, Shift("gamma", 2.0)), x**2)
    assert torch.allclose(apply_shift(x, Shift("contrast", 0.6)), 0.5 + 0.6 * (x - 0.5))
    noisy = apply_shift(x, Shift("noise", 0.1, seed=1))
    assert torch.equal(noisy, apply_shift(x, Shift("noise", 0.1, seed=1))) and not torch.equal(noisy, apply_shift(x, Shift("noise", 0.1, seed=2)))
    assert float((noisy - x).std()) == pytest.approx(0.1, rel=0.05)
    thick = apply_shift(x, Shift("thick", 3))
    assert thick.shape == x.shape and float(thick.mean()) == pytest.approx(float(x.mean()), abs=0.01)
    assert float((thick[..., 1:] - thick[..., :-1]).abs().mean()) < 0.7 * float((x[..., 1:] - x[..., :-1]).abs().mean())  # smoother along z
    field = apply_shift(x, Shift("bias", 0.2)) / x.clamp(min=1e-3)
    assert 0.3 < float(field[x > 0.2].min()) < 0.95 and 1.05 < float(field[x > 0.2].max()) < 5  # smooth multiplicative field, not identity
    lo, hi = BTCV_CT_WINDOW
    hu = np.array([[[lo - 100, lo, (lo + hi) / 2, hi, hi + 100]]], dtype=np.float32)
    assert np.allclose(apply_shift_hu(hu, Shift("gamma", 2.0), BTCV_CT_WINDOW), [lo, lo, lo + (hi - lo) / 4, hi, hi])
