"""bundles/swin_bob_brats: sample data, metadata, and train -> evaluate -> infer through monai.bundle.

The sample is real T1c brain MRI with derived T1/T2/FLAIR channels and derived sub-region labels
(``custom.sample_data.brats_from_t1c``): it is BraTS-shaped, not BraTS data.
"""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import bundle_workflow

from custom.export_bundle import DEFAULT_SCHEMA as SCHEMA

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_bob_brats"
CONFIGS = BUNDLE / "configs"
#: tiny settings: feature_size 12, 64^3 windows, 6 mm voxels (the sample fits in one window)
TINY = {"network_def#feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [6.0, 6.0, 6.0], "sw_batch_size": 1}


workflow = partial(bundle_workflow, "swin_bob_brats", **TINY)


def test_sample_is_brats_shaped(brats_sample):
    datalist = json.loads((brats_sample / "dataset.json").read_text())
    assert datalist["modality"] == {"0": "t1", "1": "t1c", "2": "t2", "3": "flair"}
    assert datalist["labels"] == {"0": "background", "1": "NCR", "2": "ED", "3": "ET"}
    item = datalist["training"][0]
    image, label = nib.load(brats_sample / item["image"]), nib.load(brats_sample / item["label"])
    assert image.shape == (256, 256, 25, 4) and label.shape == (256, 256, 25)
    assert np.allclose(image.affine, label.affine) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    lab = np.asarray(label.dataobj)
    counts = dict(zip(*np.unique(lab, return_counts=True)))
    # the real lesion (4137 voxels) is split at its median T1c into NCR and ET; ED is a 7 mm shell
    assert counts[1] + counts[3] == 4137 and abs(counts[1] - counts[3]) <= 1
    assert counts[2] > counts[1] + counts[3]
    img = np.asarray(image.dataobj)
    t1c = img[..., 1]
    assert t1c[lab == 3].min() >= t1c[lab == 1].max()  # ET is the enhancing (brighter) half
    flair = img[..., 3]
    assert flair[lab == 2].mean() > 1.5 * flair[(lab == 0) & (flair > 0)].mean()  # oedema bright in FLAIR


def test_metadata_regions_match_the_label_table():
    from custom.labels import sync_metadata

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "TC", "1": "WT", "2": "ET"}
    assert str(CONFIGS / "metadata.json") not in sync_metadata(check=True)


@pytest.fixture(scope="module")
def trained(brats_sample, tmp_path_factory) -> Path:
    """One tiny epoch from a 'Swin-BOB' checkpoint in the UKBOB reference format (4 -> 73 classes)."""
    from monai.networks.nets import SwinUNETR

    root = tmp_path_factory.mktemp("brats_bundle")
    torch.manual_seed(0)
    source = SwinUNETR(in_channels=4, out_channels=73, feature_size=12)
    ckpt = root / "swin_bob.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 1, "best_acc": 0.5}, ckpt)
    wf = workflow(["train.json"], root, "train", epochs=1, val_interval=1, num_workers=0, num_samples=1,
                  warmup_epochs=0, pretrained_ckpt=str(ckpt))
    wf.initialize()
    net = wf.parser.get_parsed_content("network")
    assert wf.parser.get_parsed_content("train#trainer").network is net  # the loaded network is trained
    assert torch.equal(net.swinViT.layers3[0].blocks[0].attn.qkv.weight, source.swinViT.layers3[0].blocks[0].attn.qkv.weight)
    assert torch.equal(net.swinViT.patch_embed.proj.weight, source.swinViT.patch_embed.proj.weight)  # 4 -> 4: as is
    assert net.out.conv.conv.weight.shape[0] == 3
    wf.run()
    wf.finalize()
    assert (root / "models" / "model.pt").is_file()
    return root


@pytest.mark.slow
def test_train_writes_a_loadable_model(trained):
    from monai.networks.nets import SwinUNETR

    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    net = SwinUNETR(in_channels=4, out_channels=3, feature_size=12)
    # CheckpointSaver with one object in save_dict writes its bare state dict (ignite's Checkpoint)
    net.load_state_dict(state)  # strict: exactly the bundle's network


@pytest.mark.slow
def test_evaluate_reports_dice_and_hd95_per_region(trained):
    wf = workflow(["train.json", "evaluate.json"], trained, "eval")
    wf.initialize()
    wf.run()
    wf.finalize()
    with open(trained / "eval" / "metrics_summary.csv") as f:
        rows = {r["organ"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"TC", "WT", "ET", "mean"}
    for region in ("TC", "WT", "ET"):
        assert 0.0 <= float(rows[region]["val_mean_dice"]) <= 1.0
        assert rows[region]["cases"] == "1"
    hd95 = [float(rows[r]["val_hd95"]) for r in ("TC", "WT", "ET")]
    # in mm on the input grid: at most the head's diagonal, unless the tiny model predicts nothing (NaN)
    assert all(np.isnan(h) or 0.0 <= h < 300.0 for h in hd95)


@pytest.mark.slow
def test_inference_writes_2023_ids_in_the_input_space(trained, brats_sample):
    wf = workflow(["inference.json"], trained, "infer")
    wf.initialize()
    wf.run()
    wf.finalize()
    seg = nib.load(trained / "eval" / "brain2_seg.nii.gz")
    image = nib.load(brats_sample / "images" / "brain2.nii.gz")
    assert seg.shape == image.shape[:3] and np.allclose(seg.affine, image.affine, atol=1e-4)
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}  # never the 2021 id 4


@pytest.mark.slow
def test_inference_refuses_a_one_channel_image(trained, btcv_sample, capsys):
    ct = btcv_sample / "images" / "ct_abdomen_crop.nii.gz"
    wf = workflow(["inference.json"], trained, "infer", input_path=str(ct), output_dir=str(trained / "bad"))
    wf.initialize()
    with pytest.raises(SystemExit) as exc:
        wf.run()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {ct}: the image has 1 channel(s), the model needs 4")
    assert not list((trained / "bad").glob("*.nii.gz"))
