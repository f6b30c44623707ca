"""custom.transfer: every checkpoint format, the channel adaptation, the head, and refusals."""

from __future__ import annotations

import argparse
import gzip
import logging
import subprocess
import sys

import pytest
import torch
from monai.networks.nets import SwinUNETR, UNet

from custom.errors import InputError
from custom.transfer import adapt_input_channels, load_pretrained, main, read_checkpoint

FS = 12  # tiny SwinUNETR: feature_size 12, inputs 32^3


def swin(in_channels: int, out_channels: int, feature_size: int = FS, seed: int = 0) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size).eval()


@pytest.fixture(scope="module")
def source() -> SwinUNETR:
    """A 'Swin-BOB' network: 4 Dixon channels, 73 classes."""
    return swin(4, 73, seed=1)


def _ssl_swinvit(sd: dict) -> dict:
    """The layout of the public Swin-UNETR SSL file model_swinvit.pt: swinViT keys as module.*."""
    return {"module." + k[len("swinViT."):]: v for k, v in sd.items() if k.startswith("swinViT.")}


def _ssl_encoder(sd: dict) -> dict:
    """The layout MONAI's filter_swinunetr maps: encoder.patch_embed.*, encoder.layers1.0.0.blocks.*."""
    out = {"encoder.mask_token": torch.zeros(1, 1, FS)}
    for k, v in sd.items():
        if k.startswith("swinViT.layers"):
            stage, zero, rest = k[len("swinViT."):].split(".", 2)
            out[f"encoder.{stage}.{zero}.0.{rest}"] = v
        elif k.startswith("swinViT."):
            out["encoder." + k[len("swinViT."):]] = v
    return out


FORMATS = {
    "monai_checkpoint_saver": lambda sd: {"model": sd},
    "ukbob_reference": lambda sd: {"state_dict": sd, "epoch": 120, "best_acc": 0.87},
    "bare_state_dict": lambda sd: dict(sd),
    "ddp_module_prefix": lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    "ssl_model_swinvit": lambda sd: {"state_dict": _ssl_swinvit(sd)},
    "ssl_encoder_prefix": lambda sd: {"model": _ssl_encoder(sd)},
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_checkpoint_format_loads_the_encoder(fmt, source, tmp_path):
    path = tmp_path / f"{fmt}.pt"
    torch.save(FORMATS[fmt](source.state_dict()), path)
    target = swin(1, 14, seed=2)
    report = load_pretrained(target, path)

    src, dst = source.state_dict(), target.state_dict()
    copied = [k for k in dst if k.startswith("swinViT.") and k != "swinViT.patch_embed.proj.weight"]
    assert len(copied) > 60
    for key in copied:  # encoder weights equal the source's wherever shapes match
        assert torch.equal(dst[key], src[key]), key
    assert set(report.adapted) >= {"swinViT.patch_embed.proj.weight"}
    assert report.adapted["swinViT.patch_embed.proj.weight"] == ((FS, 4, 2, 2, 2), (FS, 1, 2, 2, 2))
    assert report.reinitialised == ["out.conv.conv.bias", "out.conv.conv.weight"]
    if fmt.startswith("ssl"):  # encoder only: the decoder keeps its initialisation
        assert "decoder1.transp_conv.conv.weight" in report.missing
        assert set(report.adapted) == {"swinViT.patch_embed.proj.weight"}
        assert 0.12 < report.matched_fraction < 0.25  # the Swin encoder is ~17% of the weights
        assert report.skipped == (["encoder.mask_token"] if fmt == "ssl_encoder_prefix" else [])
    else:  # a whole SwinUNETR: everything but the head is copied
        assert set(report.adapted) == {
            "swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight"
        }
        assert report.missing == [] and report.skipped == []
        assert report.matched_fraction == pytest.approx(1.0)
        assert torch.equal(dst["decoder1.transp_conv.conv.weight"], src["decoder1.transp_conv.conv.weight"])


def test_head_is_reinitialised_even_with_matching_shape(source, tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"model": source.state_dict()}, path)
    target = swin(4, 73, seed=3)
    before = target.out.conv.conv.weight.detach().clone()
    load_pretrained(target, path)
    head = target.out.conv.conv.weight
    assert not torch.equal(head, source.out.conv.conv.weight)
    assert not torch.equal(head, before)  # reset, not merely kept
    load_pretrained(target, path, reinit_head=False)
    assert torch.equal(target.out.conv.conv.weight, source.out.conv.conv.weight)


def test_adapt_input_channels_math():
    w = torch.arange(2 * 4 * 1 * 1 * 1, dtype=torch.float32).reshape(2, 4, 1, 1, 1)  # rows 0..3, 4..7
    one = adapt_input_channels(w, 1)
    assert one.flatten().tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7]  # mean * 4/1 = sum
    three = adapt_input_channels(w, 3)
    assert three.shape == (2, 3, 1, 1, 1)
    assert torch.allclose(three.sum(1), w.sum(1))  # the response to identical channels is kept


@pytest.mark.parametrize("src_ch,dst_ch", [(4, 1), (1, 4)])
def test_identical_channels_give_the_same_response(src_ch, dst_ch, tmp_path):
    """C_src copies of x through the source == C_dst copies of x through the adapted network."""
    source = swin(src_ch, 3, seed=4)
    path = tmp_path / "s.pt"
    torch.save({"model": source.state_dict()}, path)
    target = swin(dst_ch, 3, seed=5)
    report = load_pretrained(target, path, reinit_head=False)
    assert len(report.adapted) == 3
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    xs, xd = x.repeat(1, src_ch, 1, 1, 1), x.repeat(1, dst_ch, 1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(source.swinViT.patch_embed(xs), target.swinViT.patch_embed(xd), atol=1e-5)
        assert torch.allclose(source.encoder1(xs), target.encoder1(xd), atol=1e-4)
        # the whole Swin encoder (all five feature maps the decoder reads) answers alike
        for a, b in zip(source.swinViT(xs, source.normalize), target.swinViT(xd, target.normalize)):
            assert torch.allclose(a, b, atol=1e-4)
        if src_ch > 1:  # channels that differ are not summarised exactly: the claim is about identical ones
            y = torch.randn(1, src_ch, 32, 32, 32, generator=torch.Generator().manual_seed(1))
            assert not torch.allclose(source.swinViT.patch_embed(y), target.swinViT.patch_embed(y.mean(1, keepdim=True)))


def test_ddp_wrapped_target(source, tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"model": source.state_dict()}, path)
    wrapped = torch.nn.DataParallel(swin(1, 14))
    report = load_pretrained(wrapped, path)
    assert len(report.loaded) == 154
    assert torch.equal(wrapped.module.swinViT.layers4[0].downsample.reduction.weight,
                       source.swinViT.layers4[0].downsample.reduction.weight)


def test_unrelated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "unet.pt"
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    torch.save({"model": unet.state_dict()}, path)
    with pytest.raises(InputError, match=r"unet\.pt: matches almost nothing of the network: 0\.0%"):
        load_pretrained(swin(1, 14), path)


def test_other_width_is_a_clear_error(source, tmp_path):
    path = tmp_path / "fs24.pt"
    torch.save({"model": swin(4, 73, feature_size=24).state_dict()}, path)
    with pytest.raises(InputError, match=r"fs24\.pt: \d+ weight\(s\) have another shape .*feature_size"):
        load_pretrained(swin(1, 14), path)


def test_pickled_object_is_refused(source, tmp_path):
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(InputError, match=r"with_args\.pt: refused: the checkpoint holds a pickled Python object \(argparse\.Namespace\)"):
        load_pretrained(swin(1, 14), path)


@pytest.mark.parametrize("content,problem", [
    (b"", "the file is empty"),
    (b"this is not a checkpoint", "is not a readable PyTorch checkpoint"),
    (None, "is not a readable PyTorch checkpoint"),  # truncated torch.save zip
    (gzip.compress(b"\x00" * 100), "is not a readable PyTorch checkpoint"),
])
def test_bad_files(content, problem, source, tmp_path):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"model": source.state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=problem):
        read_checkpoint(path)
    with pytest.raises(InputError, match="file not found"):
        read_checkpoint(tmp_path / "absent.pt")


def test_log_lists_each_adapted_and_reinitialised_key(source, tmp_path, caplog):
    path = tmp_path / "m.pt"
    torch.save({"model": source.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, path)
    with caplog.at_level(logging.INFO, logger="custom.transfer"):
        load_pretrained(swin(1, 3), path)
    text = caplog.text
    assert "adapted swinViT.patch_embed.proj.weight (12, 4, 2, 2, 2) -> (12, 1, 2, 2, 2)" in text
    assert "adapted encoder1.layer.conv1.conv.weight" in text
    assert "re-initialised out.conv.conv.weight (output head)" in text
    assert "loaded 154, adapted 3, re-initialised 2, skipped 0" in text


def test_cli_writes_a_loadable_checkpoint_and_exits_2_on_bad_input(source, tmp_path, capsys):
    src = tmp_path / "src.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, src)
    out = tmp_path / "out" / "pretrained.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "custom.transfer", str(src), "--out", str(out), "--in_channels", "1",
         "--out_channels", "3", "--feature_size", str(FS)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "adapted swinViT.patch_embed.proj.weight" in proc.stderr + proc.stdout
    saved = torch.load(out, weights_only=True)["model"]
    assert saved["swinViT.patch_embed.proj.weight"].shape == (FS, 1, 2, 2, 2)
    assert torch.equal(saved["swinViT.layers2.0.blocks.1.attn.qkv.weight"], source.swinViT.layers2[0].blocks[1].attn.qkv.weight)

    # "--reinit_head false" arrives from the command line as the string "false": the head is kept, not re-initialised
    kept = tmp_path / "kept.pt"
    main(str(src), out=str(kept), in_channels=4, out_channels=73, feature_size=FS, reinit_head="false")
    assert torch.equal(torch.load(kept, weights_only=True)["model"]["out.conv.conv.weight"], source.out.conv.conv.weight)
    with pytest.raises(SystemExit) as exc:
        main(str(src), out=str(kept), in_channels=4, out_channels=73, feature_size=FS, reinit_head="keep")
    assert exc.value.code == 2 and "--reinit_head must be true or false, got 'keep'" in capsys.readouterr().err

    bad = tmp_path / "bad.pt"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace()}, bad)
    with pytest.raises(SystemExit) as exc:
        main(str(bad), out=str(tmp_path / "x.pt"), in_channels=1, out_channels=3, feature_size=FS)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: refused")
    assert not (tmp_path / "x.pt").exists()
