"""custom.errors, custom.atomic, custom.checks (and their MONAI wrappers): one-line input errors, atomic writes, image checks."""

import gzip
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom.atomic import atomic_path, atomic_write_text
from custom.checks import check_image
from custom.errors import InputError, exit_on_input_error, find_input_error
from custom.transforms import AtomicNibabelWriter, CheckImaged, load_image_checked


def test_input_error_is_one_line_with_file_problem_fix(tmp_path):
    err = InputError(tmp_path / "a.nii.gz", "the file is empty (0 bytes)", "re-export it")
    assert str(err) == f"{tmp_path / 'a.nii.gz'}: the file is empty (0 bytes). Fix: re-export it"
    assert "\n" not in str(err)


def test_find_input_error_walks_wrapped_exceptions():
    try:
        try:
            raise InputError("x.nii", "bad")
        except InputError as inner:
            raise RuntimeError("applying transform <CheckImaged>") from inner
    except RuntimeError as outer:
        assert find_input_error(outer).path == "x.nii"
    assert find_input_error(RuntimeError("other")) is None


def test_exit_on_input_error_exits_2_with_one_line(capsys):
    def bad():
        raise RuntimeError("wrapped") from InputError("scan.nii.gz", "3 voxel(s) are NaN", "mask them")

    with pytest.raises(SystemExit) as exc:
        exit_on_input_error(bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: scan.nii.gz: 3 voxel(s) are NaN. Fix: mask them\n"
    with pytest.raises(ZeroDivisionError):  # anything else is not swallowed
        exit_on_input_error(lambda: 1 / 0)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "table.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a tab")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary left behind either
    atomic_write_text(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"


def test_atomic_write_survives_a_killed_process(tmp_path):
    """A process killed while writing leaves the old complete file (or none), never a partial one."""
    target = tmp_path / "big.bin"
    atomic_write_text(target, "old complete content")
    code = (
        "import os, signal, sys\n"
        "from custom.atomic import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'x' * 1_000_000); f.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert target.read_text() == "old complete content"


def test_atomic_nibabel_writer_writes_complete_nifti(tmp_path):
    img = MetaTensor(torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    writer = AtomicNibabelWriter()
    writer.set_data_array(img, channel_dim=0)
    writer.set_metadata({"affine": img.affine, "original_affine": img.affine})
    out = tmp_path / "pred.nii.gz"
    writer.write(out)
    loaded = nib.load(out)
    assert loaded.shape == (2, 3, 4) and np.allclose(loaded.affine, np.diag([2, 2, 3, 1]))
    assert [p.name for p in tmp_path.iterdir()] == ["pred.nii.gz"]


@pytest.mark.parametrize(
    "array, channels, message",
    [
        (np.zeros((1, 4, 4, 4)), 1, "constant"),
        (np.full((1, 4, 4, 4), np.nan), 1, "NaN"),
        (np.random.rand(2, 4, 4, 4), 1, "2 channel(s), the model needs 1"),
        (np.random.rand(4, 4, 4), None, "3D volume"),
    ],
)
def test_check_image_rejects_bad_images(array, channels, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_image(array, path="img.nii.gz", channels=channels)


def test_check_imaged_names_the_source_file():
    img = MetaTensor(torch.full((1, 3, 3, 3), float("nan")), meta={"filename_or_obj": "/data/ct_7.nii.gz"})
    with pytest.raises(InputError, match=r"^/data/ct_7.nii.gz: 27 voxel\(s\) are NaN"):
        CheckImaged("image", channels=1)({"image": img})
    good = MetaTensor(torch.rand(1, 3, 3, 3))
    assert CheckImaged("image", channels=1)({"image": good})["image"] is good


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated_gzip"])
def test_load_image_checked_gives_one_line_for_bad_files(tmp_path, btcv_sample, kind):
    path = tmp_path / "scan.nii.gz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image")
    elif kind == "truncated_gzip":
        data = (btcv_sample / "images" / "ct_abdomen_crop.nii.gz").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_image_checked(path)
    assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def test_load_image_checked_reads_real_ct(btcv_sample):
    img = load_image_checked(btcv_sample / "images" / "ct_abdomen.nii.gz")
    assert tuple(img.shape) == (1, 122, 101, 112)
    assert float(img.min()) == pytest.approx(-1207.0)


def test_parse_flag_reads_command_line_words_and_refuses_others():
    from custom.errors import parse_flag

    assert [parse_flag(v, "--x") for v in (True, 0, "false", "False", " yes ", "OFF", "1")] == [True, False, False, False, True, False, True]
    for bad in ("maybe", 2, None, 0.5):
        with pytest.raises(InputError, match=r"--x must be true or false, got .*\. Fix: write --x true or --x false"):
            parse_flag(bad, "--x")


def test_config_flag_ends_a_bundle_run_with_one_line(capsys):
    from custom.errors import EXIT_BAD_INPUT, config_flag

    assert config_flag("false", "use_etta") is False and config_flag(True, "resume") is True
    with pytest.raises(SystemExit) as exit_info:
        config_flag("maybe", "use_etta")
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: --use_etta must be true or false, got 'maybe'. Fix: write --use_etta true or --use_etta false\n"


def test_cli_main_reads_bool_arguments_as_flags(capsys):
    from custom.errors import cli_main

    @cli_main
    def report(output_dir: str, plots: bool = True) -> tuple:
        return output_dir, plots

    assert report("out", plots="false") == ("out", False) and report("false") == ("false", True)  # only bool arguments
    with pytest.raises(SystemExit) as exc:
        report("out", "sometimes")
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == (
        "error: --plots must be true or false, got 'sometimes'. Fix: write --plots true or --plots false")


def test_parse_overrides_reads_yaml_values_and_refuses_malformed_items():
    from custom.errors import parse_overrides

    assert parse_overrides(["feature_size=12", "roi_size=[64, 64, 64]", "use_etta=true"]) == {
        "feature_size": 12, "roi_size": [64, 64, 64], "use_etta": True}
    for bad in ("feature_size", "=12"):
        with pytest.raises(InputError, match=r"--net_override .* is not KEY=VALUE\. Fix: e.g. --net_override a=1"):
            parse_overrides([bad], "--net_override", "a=1")


def test_loaders_hold_back_only_the_nvimgcodec_notices(caplog, btcv_sample):
    """MONAI's ``LoadImage`` tells twice that nvImageCodec is missing (on every CPU machine); ours do not."""
    import logging
    import warnings

    from monai.data.nvimgcodec_pydicom_plugin import is_nvimgcodec_available
    from monai.transforms import LoadImage

    from custom.transforms import SafeLoadImaged

    if is_nvimgcodec_available():
        pytest.skip("nvImageCodec is installed: MONAI gives no notice to hold back")

    def notices(build) -> list[str]:
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            build()
        return [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]

    assert sum("nvImageCodec" in n for n in notices(LoadImage)) == 2  # MONAI's own: both notices
    image = btcv_sample / "images" / "ct_dicom.nii.gz"
    assert not any("nvImageCodec" in n for n in notices(lambda: SafeLoadImaged(keys="image")({"image": str(image)})))
    assert not any("nvImageCodec" in n for n in notices(lambda: load_image_checked(image)))
    assert logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").level == logging.NOTSET  # left as it was
