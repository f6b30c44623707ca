"""Bad input at every entry point: one line (file, problem, fix), a non-zero exit, no partial output.

One test per row of the README table "Reliability: what happens with bad input". The entry points
run for real in ONE child process (``python tests/test_bad_input.py CASES RESULTS``): each case calls
the function that its command line calls (``monai.bundle.scripts.run`` for ``python -m monai.bundle
run``, ``custom.solf.__main__.run``, ``custom.transfer.main``, ``custom.sample_data.main``),
catches its ``SystemExit`` and stderr, and lists what the case left in its output folder; one
import of MONAI serves every case (``tests/test_bundle_btcv.py`` runs the literal ``python -m monai.bundle
run`` on bad inputs too).
Networks are tiny (SwinUNETR feature_size 12) with random weights: every bad input is refused
before or instead of inference.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BTCV = REPO / "bundles" / "swin_bob_btcv"
TINY_BTCV = {"network_def#feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [6.0, 6.0, 6.0], "sw_batch_size": 1}


# ---------------------------------------------------------------- the child process
def _files(folder: str | None) -> list[str]:
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def _call(entry: str, args: dict) -> None:
    if entry in ("bundle_inference", "bundle_evaluate"):
        from monai.bundle.scripts import run

        configs = ["train.json", "evaluate.json"] if entry == "bundle_evaluate" else ["inference.json"]
        run(
            run_id="run", bundle_root=str(BTCV), config_file=[str(BTCV / "configs" / c) for c in configs],
            logging_file=str(BTCV / "configs" / "logging.conf"), **TINY_BTCV, **args,
        )
    elif entry == "segment":
        from custom.segment import main

        main(args["argv"])
    elif entry == "solf":
        from custom.solf.__main__ import run

        run(**args)
    elif entry == "transfer":
        from custom.transfer import main

        main(**args)
    elif entry == "sample_data":
        from custom.sample_data import main

        main(**args)
    else:
        raise ValueError(entry)


def drive(cases_file: str, results_file: str) -> None:
    """Run every case of ``cases_file`` (``{name: {entry, args, output}}``); write the outcomes."""
    results = {}
    for name, case in json.loads(Path(cases_file).read_text()).items():
        err = io.StringIO()
        code, t0 = 0, time.time()
        with contextlib.redirect_stderr(err):
            try:
                _call(case["entry"], case["args"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - an escaped traceback is what the tests look for
                traceback.print_exc()
                code = 1
        results[name] = {"code": code, "stderr": err.getvalue(), "files": _files(case.get("output"))}
        print(f"{name}: exit {code} after {time.time() - t0:.1f} s", flush=True)
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2])
    sys.exit(0)

# ---------------------------------------------------------------- the tests
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


class _Evil:
    """Pickled into a checkpoint: ``torch.load(weights_only=True)`` must refuse to rebuild it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def bad(tmp_path_factory, btcv_sample, ukbob_sample) -> dict[str, str]:
    """Every bad file once, built from the real sample CT (30-slice crop) and its labels."""
    d = tmp_path_factory.mktemp("bad")
    ct = nib.load(btcv_sample / "images" / "ct_abdomen_crop.nii.gz")
    lab = nib.load(btcv_sample / "labels" / "ct_abdomen_crop.nii.gz")
    hu, aff, ids = np.asarray(ct.dataobj, dtype=np.float32), ct.affine, np.asarray(lab.dataobj).astype(np.uint8)
    raw = (btcv_sample / "images" / "ct_abdomen_crop.nii.gz").read_bytes()
    files = {"good_ct": _save(d / "good_ct.nii.gz", hu, aff), "good_label": _save(d / "good_label.nii.gz", ids, aff)}
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (d / "not_image.nii.gz").write_text("patient,age\n7,54\n")
    (d / "empty.nii.gz").write_bytes(b"")
    nan = hu.copy()
    nan[10:20, 10:20, 5] = np.nan
    files.update(
        truncated=str(d / "truncated.nii.gz"), not_image=str(d / "not_image.nii.gz"), empty=str(d / "empty.nii.gz"),
        four_channels=str(ukbob_sample / "images" / "ct_abdomen_crop.nii.gz"),
        nan=_save(d / "nan.nii.gz", nan, aff), constant=_save(d / "constant.nii.gz", np.full_like(hu, -1000.0), aff),
        label_outside=_save(d / "label_outside.nii.gz", np.where(ids == 1, 99, ids).astype(np.uint8), aff),
        label_other_grid=_save(d / "label_other_grid.nii.gz", ids[::2, ::2, :], aff @ np.diag([2.0, 2.0, 1.0, 1.0])),
        solf_outside=_save(d / "solf_outside.nii.gz", np.where(ids == 1, 99, ids).astype(np.uint8), aff),
    )
    # checkpoints: a tiny BTCV network's weights, one with a pickled object, one truncated
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    (d / "models").mkdir()
    torch.save({"model": net.state_dict()}, d / "models" / "model.pt")
    (d / "pickled").mkdir()
    torch.save({"model": net.state_dict(), "extra": _Evil()}, d / "pickled" / "model.pt")
    good_pt = (d / "models" / "model.pt").read_bytes()
    (d / "truncated_pt").mkdir()
    (d / "truncated_pt" / "model.pt").write_bytes(good_pt[: len(good_pt) // 3])
    files.update(ckpt_dir=str(d / "models"), pickled_ckpt_dir=str(d / "pickled"), truncated_ckpt_dir=str(d / "truncated_pt"))
    files["pickled_pt"] = str(d / "pickled" / "model.pt")
    files["truncated_pt"] = str(d / "truncated_pt" / "model.pt")
    # "unwritable": a folder below a regular file (root ignores chmod, so this is the portable way)
    (d / "a_file").write_text("x")
    files["unwritable"] = str(d / "a_file" / "out")
    files["root"] = str(d)
    return files


# rows of the README table: (entry point, case, the bad file's key, how the case is run)
INFERENCE_CASES = ["truncated", "not_image", "empty", "four_channels", "nan", "constant"]
SOLF_BAD = ["truncated", "not_image", "empty", "solf_outside", "label_other_grid"]
TRANSFER_CASES = ["empty", "not_image", "truncated_pt", "pickled_pt", "unwritable"]


def _cases(bad: dict[str, str]) -> dict[str, dict]:
    out = lambda name: str(Path(bad["root"]) / "out" / name)  # noqa: E731
    cases: dict[str, dict] = {}
    for case in INFERENCE_CASES:
        cases[f"bundle_inference/{case}"] = {
            "entry": "bundle_inference", "output": out(f"inf_{case}"),
            "args": {"input_path": bad[case], "output_dir": out(f"inf_{case}"), "ckpt_dir": bad["ckpt_dir"]},
        }
    batch = Path(bad["root"]) / "batch"  # a folder: one good CT and four bad files
    batch.mkdir(exist_ok=True)
    for key in ("good_ct", "nan", "constant", "truncated", "not_image"):
        shutil.copy(bad[key], batch / Path(bad[key]).name)
    cases["bundle_inference/batch"] = {
        "entry": "bundle_inference", "output": out("inf_batch"),
        "args": {"input_path": str(batch), "output_dir": out("inf_batch"), "ckpt_dir": bad["ckpt_dir"]},
    }
    cases["bundle_inference/unwritable"] = {
        "entry": "bundle_inference", "output": None,
        "args": {"input_path": bad["good_ct"], "output_dir": bad["unwritable"], "ckpt_dir": bad["ckpt_dir"]},
    }
    for case, key in (("pickled_ckpt", "pickled_ckpt_dir"),):
        cases[f"bundle_inference/{case}"] = {
            "entry": "bundle_inference", "output": out(f"inf_{case}"),
            "args": {"input_path": bad["good_ct"], "output_dir": out(f"inf_{case}"), "ckpt_dir": bad[key]},
        }
    for case, image, label in (
        ("label_outside", "good_ct", "label_outside"), ("label_other_grid", "good_ct", "label_other_grid"),
        ("truncated", "truncated", "good_label"), ("nan", "nan", "good_label"),
    ):
        cases[f"bundle_evaluate/{case}"] = {
            "entry": "bundle_evaluate", "output": out(f"eval_{case}"),
            "args": {"eval_datalist": [{"image": bad[image], "label": bad[label]}], "output_dir": out(f"eval_{case}"),
                     "ckpt_dir": bad["ckpt_dir"]},
        }
    # the segment command (one volume) over the same bundle, with its own --model and output file
    tiny = ["--device", "cpu", "--override", "feature_size=12", "roi_size=[64,64,64]", "pixdim=[6,6,6]", "sw_batch_size=1"]
    model = str(Path(bad["ckpt_dir"]) / "model.pt")
    for case, image, weights, target in (
        ("truncated", bad["truncated"], model, out("seg_truncated") + "/seg.nii.gz"),
        ("four_channels", bad["four_channels"], model, out("seg_four_channels") + "/seg.nii.gz"),
        ("pickled_ckpt", bad["good_ct"], bad["pickled_pt"], out("seg_pickled_ckpt") + "/seg.nii.gz"),
        ("unwritable", bad["good_ct"], model, bad["unwritable"] + "/seg.nii.gz"),
    ):
        cases[f"segment/{case}"] = {"entry": "segment", "output": str(Path(target).parent),
                                    "args": {"argv": ["-i", image, "-o", target, "--model", weights, *tiny]}}
    # SOLF: one batch with every bad label file and one good one; it must go on and report each
    datalist = Path(bad["root"]) / "solf_datalist.json"
    entries = [{"image": bad["good_ct"], "label": bad["good_label"]}] + [
        {"image": bad["good_ct"], "label": bad[k]} for k in SOLF_BAD
    ]
    datalist.write_text(json.dumps({"training": entries}))
    cases["solf/batch"] = {"entry": "solf", "output": out("solf"),
                           "args": {"datalist": str(datalist), "output_dir": out("solf"), "workers": 1, "plots": False, "body": "image"}}
    cases["solf/unwritable"] = {"entry": "solf", "output": None,
                                "args": {"datalist": str(datalist), "output_dir": bad["unwritable"], "workers": 1}}
    for case in TRANSFER_CASES:
        src = bad[case] if case != "unwritable" else str(Path(bad["ckpt_dir"]) / "model.pt")
        target = bad["unwritable"] + "/model.pt" if case == "unwritable" else out(f"transfer_{case}") + "/model.pt"
        cases[f"transfer/{case}"] = {"entry": "transfer", "output": out(f"transfer_{case}"),
                                     "args": {"src": src, "out": target, "in_channels": 1, "out_channels": 3, "feature_size": 12}}
    cases["sample_data/unwritable"] = {"entry": "sample_data", "output": None, "args": {"root": bad["unwritable"], "only": "btcv_sample"}}
    return cases


@pytest.fixture(scope="module")
def outcomes(bad, tmp_path_factory) -> dict[str, dict]:
    cases = _cases(bad)
    d = tmp_path_factory.mktemp("driver")
    (d / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, str(d / "cases.json"), str(d / "results.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)  # per-case exit codes and times (pytest -s shows them)
    results = json.loads((d / "results.json").read_text())
    for name in results:
        results[name]["case"] = cases[name]
    return results


def _one_error_line(res: dict, path: str) -> str:
    assert "Traceback" not in res["stderr"], res["stderr"][-2000:]
    lines = [ln for ln in res["stderr"].splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res["stderr"][-2000:]
    assert path in lines[0] and ". Fix: " in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", INFERENCE_CASES + ["unwritable", "pickled_ckpt"])
def test_bundle_inference_refuses_bad_input(outcomes, bad, case):
    res = outcomes[f"bundle_inference/{case}"]
    assert res["code"] == 2, res["stderr"][-2000:]
    path = {"unwritable": bad["unwritable"], "pickled_ckpt": bad["pickled_pt"]}.get(case, bad.get(case))
    line = _one_error_line(res, path)
    assert res["files"] == []  # no partial prediction
    expected = {"four_channels": "4 channel(s), the model needs 1", "nan": "NaN", "constant": "constant",
                "empty": "empty", "pickled_ckpt": "pickled Python object", "unwritable": "output folder"}
    assert expected.get(case, "") in line


@pytest.mark.slow
def test_bundle_inference_batch_goes_on_past_bad_files_and_reports_each(outcomes):
    res = outcomes["bundle_inference/batch"]
    assert res["code"] == 0, res["stderr"][-2000:]
    assert "Traceback" not in res["stderr"]
    skipped = sorted(ln for ln in res["stderr"].splitlines() if ln.startswith("skipped: "))
    assert len(skipped) == 4 and all(". Fix: " in ln for ln in skipped), skipped
    assert res["files"] == ["errors.csv", "good_ct_seg.nii.gz"]  # the good case was segmented
    out = Path(res["case"]["output"])
    errors = __import__("pandas").read_csv(out / "errors.csv")
    assert sorted(Path(f).name for f in errors["file"]) == ["constant.nii.gz", "nan.nii.gz", "not_image.nii.gz", "truncated.nii.gz"]
    assert nib.load(out / "good_ct_seg.nii.gz").shape == (122, 101, 30)  # inverted back to the input's grid


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated", "four_channels", "pickled_ckpt", "unwritable"])
def test_segment_command_refuses_bad_input(outcomes, bad, case):
    res = outcomes[f"segment/{case}"]
    assert res["code"] == 2, res["stderr"][-2000:]
    path = {"pickled_ckpt": bad["pickled_pt"], "unwritable": bad["unwritable"]}.get(case, bad.get(case))
    line = _one_error_line(res, path)  # the user's file, not the temporary copy segment runs on
    assert res["files"] == []
    assert {"truncated": "cannot be read", "four_channels": "4 channel(s)", "pickled_ckpt": "refused: the checkpoint holds",
            "unwritable": "output folder"}[case] in line


@pytest.mark.slow
@pytest.mark.parametrize("case", ["label_outside", "label_other_grid", "truncated", "nan"])
def test_bundle_evaluate_refuses_bad_input(outcomes, bad, case):
    res = outcomes[f"bundle_evaluate/{case}"]
    assert res["code"] == 2, res["stderr"][-2000:]
    line = _one_error_line(res, bad[case])
    assert res["files"] == []  # no metrics CSV
    assert {"label_outside": "label id(s) [99] are outside the taxonomy (0..13)", "label_other_grid": "label grid",
            "truncated": "cannot be read as an image", "nan": "NaN"}[case] in line


@pytest.mark.slow
def test_solf_batch_goes_on_past_bad_files_and_reports_each(outcomes, bad):
    res = outcomes["solf/batch"]
    assert res["code"] == 0, res["stderr"][-2000:]
    assert "Traceback" not in res["stderr"]
    out = Path(res["case"]["output"])
    errors = __import__("pandas").read_csv(out / "errors.csv")
    by_file = dict(zip(errors["label"], errors["error"]))
    assert set(by_file) == {bad[k] for k in SOLF_BAD}
    assert "cannot be read" in by_file[bad["truncated"]] and "[99]" in by_file[bad["solf_outside"]]
    assert "label grid (61, 51, 30) differs from its image's (122, 101, 30)" in by_file[bad["label_other_grid"]]
    assert all("\n" not in e and ". Fix: " in e for e in by_file.values())
    assert json.loads((out / "summary.json").read_text())["errors"] == len(SOLF_BAD)
    written = [f for f in res["files"] if f.startswith("labels/")]
    assert len(written) == 1 and written[0].endswith("good_label.nii.gz")  # the good volume went through


@pytest.mark.slow
def test_solf_unwritable_output_folder(outcomes, bad):
    res = outcomes["solf/unwritable"]
    assert res["code"] == 2
    assert "output folder" in _one_error_line(res, bad["unwritable"])


@pytest.mark.slow
@pytest.mark.parametrize("case", TRANSFER_CASES)
def test_transfer_refuses_bad_checkpoints(outcomes, bad, case):
    res = outcomes[f"transfer/{case}"]
    assert res["code"] == 2, res["stderr"][-2000:]
    line = _one_error_line(res, bad["unwritable"] if case == "unwritable" else bad[case])
    assert res["files"] == []
    assert {"pickled_pt": "refused: the checkpoint holds a pickled Python object (posix.system)", "empty": "empty"}.get(case, "") in line


@pytest.mark.slow
def test_sample_data_unwritable_cache(outcomes, bad):
    res = outcomes["sample_data/unwritable"]
    assert res["code"] == 2
    _one_error_line(res, "a_file")


def test_pickled_checkpoint_is_refused_by_the_bundle_loader(bad):
    """``custom.transfer.SafeCheckpointLoader`` (the bundles' CheckpointLoader): refuses, one line."""
    from ignite.engine import Engine

    from custom.errors import InputError
    from custom.transfer import SafeCheckpointLoader

    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    engine = Engine(lambda e, b: None)
    with pytest.raises(InputError, match=r"refused: the checkpoint holds a pickled Python object \(posix.system\)"):
        SafeCheckpointLoader(bad["pickled_pt"], {"model": net})(engine)
    wrong = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)  # another head: does not fit
    with pytest.raises(InputError, match=r"does not fit this network \(size mismatch for out.conv.conv.weight"):
        SafeCheckpointLoader(str(Path(bad["ckpt_dir"]) / "model.pt"), {"model": wrong})(engine)
    SafeCheckpointLoader(str(Path(bad["ckpt_dir"]) / "model.pt"), {"model": net})(engine)  # the good one loads


def test_label_and_grid_checks_name_the_file(bad):
    from monai.transforms import LoadImaged

    from custom.errors import InputError
    from custom.transforms import CheckLabeld, CheckSameGridd

    load = LoadImaged(["image", "label"], ensure_channel_first=True)
    good = load({"image": bad["good_ct"], "label": bad["good_label"]})
    assert CheckSameGridd("label")(CheckLabeld("label", 14)(good)) is not None
    with pytest.raises(InputError, match=r"label id\(s\) \[99\] are outside the taxonomy \(0..13\)") as exc:
        CheckLabeld("label", 14)(load({"image": bad["good_ct"], "label": bad["label_outside"]}))
    assert exc.value.path == bad["label_outside"]
    with pytest.raises(InputError, match=r"label grid \(shape \(61, 51, 30\), spacing \[6.0, 6.0, 3.0\] mm\) differs") as exc:
        CheckSameGridd("label")(load({"image": bad["good_ct"], "label": bad["label_other_grid"]}))
    assert exc.value.path == bad["label_other_grid"]
