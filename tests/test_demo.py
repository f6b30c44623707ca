"""custom.demo: the CPU recipe's settings and rebuilding its network from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from custom.demo import SMALL, load_small, swin_unetr_args


@pytest.mark.parametrize("window_size,in_channels,out_channels", [(7, 1, 14), (4, 4, 73)])
def test_swin_unetr_args_read_the_architecture_from_the_weights(window_size: int, in_channels: int, out_channels: int) -> None:
    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=12, window_size=window_size)
    assert swin_unetr_args(net.state_dict()) == {
        "in_channels": in_channels, "out_channels": out_channels, "feature_size": 12, "window_size": window_size,
        "spatial_dims": 3,
    }


def test_load_small_rebuilds_the_demo_network(tmp_path) -> None:
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=SMALL["feature_size"],
                    window_size=SMALL["network_def#window_size"]).eval()
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    loaded = load_small(tmp_path / "model.pt").eval()
    x = torch.randn(1, 1, *SMALL["roi_size"])
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert loaded.swinViT.layers1[0].blocks[0].window_size == (4, 4, 4)
    from_dict = load_small(torch.load(tmp_path / "model.pt", weights_only=True)).eval()  # an already loaded checkpoint
    with torch.no_grad():
        assert torch.equal(from_dict(x), net(x))
