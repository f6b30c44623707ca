"""``custom.inferers``: the streaming sliding window decides the same labels as MONAI's stitched output."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from custom.inferers import StreamingSlidingWindowInferer, decide_labels, sliding_window_labels


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(2, 5, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(5, 5, 3, padding=1)).eval()


CASES = [  # input shape, roi, overlap, blending, padding of an input smaller than a window
    ((1, 2, 40, 33, 70), (16, 16, 16), 0.5, "gaussian", "constant"),
    ((2, 2, 20, 10, 9), (16, 16, 16), 0.25, "constant", "constant"),  # smaller than a window: padded, then cropped
    ((1, 2, 30, 34, 6), (16, 16, 16), 0.5, "gaussian", "replicate"),  # a thin slab padded with its edge slices (the bundles')
    ((1, 2, 50, 40, 30), (16, 32, 16), 0.0, "gaussian", "constant"),
    ((1, 2, 37, 41, 29), (16, 16, 16), 0.6, "gaussian", "constant"),
]


@pytest.mark.parametrize("shape,roi,overlap,mode,padding_mode", CASES)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_same_labels_as_monai_stitched_output(net, shape, roi, overlap, mode, padding_mode, activation):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = sliding_window_inference(x, roi, 3, net, overlap=overlap, mode=mode, padding_mode=padding_mode)
        labels = sliding_window_labels(x, roi, 3, net, overlap=overlap, mode=mode, padding_mode=padding_mode, activation=activation)
    expected = reference.argmax(1, keepdim=True) if activation == "softmax" else reference > 0
    assert labels.dtype == torch.uint8
    assert labels.shape == expected.shape
    assert torch.equal(labels, expected.to(torch.uint8))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_any_stream_axis_and_float16_buffer(net, axis):
    x = torch.randn((1, 2, 30, 34, 38), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = sliding_window_inference(x, (16, 16, 16), 2, net, overlap=0.5, mode="gaussian").argmax(1, keepdim=True)
        exact = sliding_window_labels(x, (16, 16, 16), 2, net, overlap=0.5, mode="gaussian", axis=axis)
        half = sliding_window_labels(x, (16, 16, 16), 2, net, overlap=0.5, mode="gaussian", axis=axis, buffer_dtype=torch.float16)
    assert torch.equal(exact, expected.to(torch.uint8))
    assert (half == exact).float().mean() > 0.999  # float16 sums may flip near-ties only


def test_inferer_keeps_metadata_for_invertd(net):
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    x = MetaTensor(torch.randn(1, 2, 20, 20, 20), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    with torch.no_grad():
        out = StreamingSlidingWindowInferer(roi_size=16, sw_batch_size=2, overlap=0.25)(x, net)
    assert isinstance(out, MetaTensor) and out.shape == (1, 1, 20, 20, 20)
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "case.nii.gz"


def test_only_about_one_window_of_scores_is_held(net, monkeypatch):
    """The largest stitching buffer is one window deep along the streamed axis, not the volume."""
    sizes = []
    original = torch.zeros

    def spy(*args, **kwargs):
        t = original(*args, **kwargs)
        if t.dtype == torch.float32 and t.ndim == 5:
            sizes.append(t.shape)
        return t

    x = torch.randn(1, 2, 24, 24, 96)
    monkeypatch.setattr(torch, "zeros", spy)
    with torch.no_grad():
        sliding_window_labels(x, 16, 4, net, overlap=0.5)
    monkeypatch.undo()
    assert sizes and max(s[-1] for s in sizes) <= 8  # slabs between window edges (16 * 0.5), never 96 deep


def test_decide_labels():
    scores = torch.tensor([[[[[0.2]]], [[[1.5]]], [[[-3.0]]]]])  # (1, 3, 1, 1, 1)
    assert decide_labels(scores, "softmax").item() == 1
    assert decide_labels(scores, "sigmoid").flatten().tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="softmax"):
        decide_labels(scores, "relu")


def test_fused_attention_same_labels_and_network_restored():
    from monai.networks.nets import SwinUNETR
    from monai.networks.nets.swin_unetr import WindowAttention

    torch.manual_seed(0)
    swin = SwinUNETR(in_channels=1, out_channels=4, feature_size=12).eval()
    x = torch.randn((1, 1, 80, 64, 64), generator=torch.Generator().manual_seed(3))
    seen: list[bool] = []
    attention = next(m for m in swin.modules() if isinstance(m, WindowAttention))
    hook = attention.register_forward_hook(lambda m, a, o: seen.append("forward" in vars(m)))
    with torch.no_grad():
        expected = sliding_window_inference(x, (64, 64, 64), 2, swin, overlap=0.5, mode="gaussian").argmax(1, keepdim=True)
        seen.clear()
        fused = StreamingSlidingWindowInferer((64, 64, 64), 2, overlap=0.5, mode="gaussian")(x, swin)
        assert seen and all(seen)  # every window ran the fused attention ...
        seen.clear()
        plain = StreamingSlidingWindowInferer((64, 64, 64), 2, fused_attention=False, overlap=0.5, mode="gaussian")(x, swin)
    hook.remove()
    assert seen and not any(seen)  # ... only when asked, and MONAI's forward is back after the call
    assert all("forward" not in vars(m) for m in swin.modules())
    assert torch.equal(plain, expected.to(torch.uint8))
    assert (fused == plain).float().mean() > 0.9999  # float rounding may flip exact near-ties only
