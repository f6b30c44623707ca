"""PNG overlays, GIF sweeps, the evaluation handler and the CLI of ``custom.visualize`` on the real CT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from custom.labels import UKBOB_NUM_CLASSES
from custom.visualize import OverlaySaver, label_colors, pick_slice, render_slice, save_overlay_png, save_sweep_gif, to_display_volume


@pytest.fixture(scope="module")
def ct(btcv_sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 30-slice real CT crop: (HU image, BTCV labels, affine)."""
    img = nib.load(btcv_sample / "images" / "ct_abdomen_crop.nii.gz")
    lab = nib.load(btcv_sample / "labels" / "ct_abdomen_crop.nii.gz")
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(lab.dataobj).astype(np.int64), img.affine


def test_colours_fixed_and_distinct():
    colors = label_colors(UKBOB_NUM_CLASSES)
    assert colors.shape == (73, 3) and colors[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in colors}) == 73  # every organ its own colour
    np.testing.assert_array_equal(label_colors(14), colors[:14])  # same id, same colour in every taxonomy


def test_display_orientation_radiological(ct):
    """RAS volume -> picture with the patient's right on the left and anterior at the top."""
    vol = np.zeros((4, 6, 2), dtype=np.float32)
    vol[3, 0, 0] = 1.0  # RAS: x=3 is the patient's rightmost voxel, y=0 the most posterior one
    pic = render_slice(vol, None, 0, label_colors(2), window=(0.0, 1.0))
    assert pic.shape == (6, 4, 3)
    rows, cols = np.nonzero(pic[..., 0])
    assert (rows.tolist(), cols.tolist()) == ([5], [0])  # right -> left column, posterior -> bottom row

    # a LAS copy of the same CT is re-oriented to the RAS picture
    image, _, affine = ct
    flipped_affine = affine @ np.array([[-1, 0, 0, image.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(to_display_volume(image[::-1], flipped_affine), to_display_volume(image, affine))


def test_overlay_png_and_gif(ct, tmp_path):
    image, label, affine = ct
    pred = np.where(label == 6, 6, 0)  # "prediction": the liver only
    png = save_overlay_png(tmp_path / "case.png", image, pred, label, taxonomy="btcv", affine=affine, window=(-175, 250))
    pic = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pic.shape[1] > 3 * 300  # three panels side by side
    assert (np.ptp(pic, axis=2) > 40).sum() > 1000  # coloured (non-grey) organ pixels are drawn

    index = pick_slice(label)
    rgb = render_slice(image, label, index, label_colors(14), alpha=0.45, window=(-175, 250))
    grey = render_slice(image, None, index, label_colors(14), window=(-175, 250)).astype(float)
    shown = label[:, :, index].T[::-1, ::-1]
    liver = shown == 6
    assert liver.any()
    expected = (0.55 * grey[liver] + 0.45 * label_colors(14)[6]).astype(np.uint8)
    np.testing.assert_allclose(rgb[liver], expected, atol=1)
    np.testing.assert_array_equal(rgb[shown == 0], grey[shown == 0])  # background stays grey
    assert label[:, :, index].astype(bool).sum() == max(label[:, :, k].astype(bool).sum() for k in range(label.shape[2]))

    gif = save_sweep_gif(tmp_path / "case.gif", image, pred, label, affine=affine, step=3)
    with Image.open(gif) as im:
        assert im.n_frames == len(range(0, image.shape[2], 3))
        assert im.size == (3 * image.shape[0], image.shape[1])


def test_overlay_saver_handler_per_case(ct, tmp_path):
    import torch
    from monai.data import MetaTensor

    image, label, affine = ct
    meta = {"filename_or_obj": "/data/patient_7.nii.gz"}
    onehot = torch.nn.functional.one_hot(torch.as_tensor(label), 14).permute(3, 0, 1, 2).float()
    item = {
        "image": MetaTensor(image[None], affine=affine, meta=dict(meta)),
        "pred": MetaTensor(onehot, affine=affine, meta=dict(meta)),
        "label": MetaTensor(onehot, affine=affine, meta=dict(meta)),
    }

    class State:
        output = [item]

    class FakeEngine:
        state = State()

    saver = OverlaySaver(tmp_path, taxonomy="btcv", gif=True, gif_step=10)
    saver(FakeEngine())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patient_7_overlay.png", "patient_7_sweep.gif"]


def test_cli_writes_png(btcv_sample, tmp_path):
    image = btcv_sample / "images" / "ct_abdomen_crop.nii.gz"
    label = btcv_sample / "labels" / "ct_abdomen_crop.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "custom.visualize", str(image), str(label), str(label), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ct_abdomen_crop_overlay.png").stat().st_size > 10_000



def test_cli_bad_file_one_line(btcv_sample, tmp_path, capsys):
    from custom.visualize import main

    with pytest.raises(SystemExit) as exc:
        main([str(btcv_sample / "images" / "ct_abdomen_crop.nii.gz"), str(tmp_path / "nope.nii.gz")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.nii.gz: file not found" in err[0]
