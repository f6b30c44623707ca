"""Segment one volume with a Swin-BOB bundle, in the manner of TotalSegmentator's command line.

    python -m custom.segment -i ct.nii.gz -o ct_seg.nii.gz --bundle btcv --stats
    python -m custom.segment -i dicom_series/ -o seg.nii.gz --bundle btcv --etta --device cuda

``INPUT`` is a NIfTI (or NRRD/MHA) file or a folder holding one DICOM series. The bundle's own
``configs/inference.json`` runs underneath (``monai.bundle.run`` with overrides: ``input_path``,
``output_dir``, ``device``, ``use_etta``), so the command does exactly what the bundle does:
preprocessing, sliding-window (or ETTA) inference, inversion to the input's grid, label map.
``OUTPUT`` is the label map (``.nii.gz``, uint8, the input's grid and affine). ``--stats`` also
writes ``OUTPUT`` with ``.json`` in place of ``.nii.gz``, in TotalSegmentator's ``statistics.json``
format (:mod:`custom.statistics`: per organ ``volume`` mm^3 and ``intensity``, plus ``volume_ml``,
``voxels``, ``partial``, ``qc``), names from ``custom.labels``. ``--qc`` judges every organ against
the bundle's ``models/qc_reference.json`` (:mod:`custom.solf.qc`): ``<stem>_qc.json`` and ``_qc.png``.

Bad input (missing or unreadable file, wrong channel count, missing weights, ...) prints one line
``error: ...`` and exits with code 2; nothing is written at ``OUTPUT`` unless the whole run succeeds
(the bundle writes into a temporary folder beside it, and the results are renamed into place).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from custom.io import InputError, atomic_path, check_readable, check_writable_dir, cli_main, parse_overrides
from custom.labels import BRATS_LABELS, BTCV_LABELS, UKBOB_LABELS

REPO = Path(__file__).resolve().parents[1]
#: --bundle choice -> (bundle folder name, names of the label ids the bundle writes)
BUNDLES: Mapping[str, tuple[str, Mapping[int, str]]] = {
    "btcv": ("swin_bob_btcv", BTCV_LABELS),
    "ukbob": ("swin_bob_ukbob", UKBOB_LABELS),
    "brats": ("swin_bob_brats", BRATS_LABELS),  # the bundle writes BraTS 2023 ids 1 NCR, 2 ED, 3 ET
}


def _log(msg: str) -> None:
    print(f"[segment] {msg}", file=sys.stderr, flush=True)


def stats_path(output: str | os.PathLike) -> Path:
    """``seg.nii.gz`` -> ``seg.json``."""
    output = Path(output)
    name = output.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")


def bundle_dir(bundle: str, bundles_root: str | os.PathLike | None = None) -> Path:
    if bundle not in BUNDLES:
        raise InputError(None, f"--bundle {bundle} is not one of {sorted(BUNDLES)}", "pick btcv, brats or ukbob")
    folder = Path(bundles_root or REPO / "bundles") / BUNDLES[bundle][0]
    if not (folder / "configs" / "inference.json").is_file():
        raise InputError(folder, "no configs/inference.json", "run from a checkout of the project or pass --bundles_root")
    return folder


def check_inputs(input_path: Path, output: Path, ckpt: Path, device: str, etta: bool, config: Mapping[str, Any]) -> None:
    """Everything that can be checked before a network is built; :class:`InputError` otherwise."""
    check_readable(input_path)
    if not output.name.endswith((".nii.gz", ".nii")):
        raise InputError(output, "the output must be a NIfTI file name", "end it with .nii.gz")
    if output.is_dir():
        raise InputError(output, "is a folder", "give a file name such as seg.nii.gz")
    check_writable_dir(output.parent)
    if not ckpt.is_file():
        raise InputError(ckpt, "model weights not found",
                         "train the bundle (configs/train.json), fetch the files in large_files.yml, or pass --model PATH")
    if etta and "use_etta" not in config:
        raise InputError(None, "--etta: this bundle's inference.json has no `use_etta` switch", "run without --etta")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError(None, "--device cuda: no CUDA device is available", "use --device cpu")


def label_stats(label_file: Path, image: Any, names: Mapping[int, str], qc: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """TotalSegmentator-format statistics of a written label map (:func:`custom.statistics.organ_statistics`).

    ``image`` is the input as loaded by MONAI (channel-first ``(C, H, W, D)``) on the label's grid;
    ``qc``: the per-scan QC dict whose verdicts fill each organ's ``qc`` field.
    """
    import nibabel as nib

    from custom.statistics import organ_statistics

    seg = nib.load(str(label_file))
    return organ_statistics(np.asarray(seg.dataobj), np.asarray(image), seg.affine, names, qc=qc)


def segment(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    bundle: str = "btcv",
    etta: bool = False,
    device: str | None = None,
    stats: bool = False,
    model: str | os.PathLike | None = None,
    bundles_root: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    qc: bool = False,
) -> Path:
    """Run ``bundle``'s inference.json on one volume; write ``output`` (and its stats); return it."""
    from monai.bundle import ConfigParser

    folder = bundle_dir(bundle, bundles_root)
    input_path, output = Path(input_path).expanduser().resolve(), Path(output).expanduser().resolve()
    config_file = folder / "configs" / "inference.json"
    config = ConfigParser.load_config_file(str(config_file))
    ckpt = Path(model).resolve() if model else folder / "models" / "model.pt"
    device = device or ("cuda" if _cuda() else "cpu")
    check_inputs(input_path, output, ckpt, device, etta, config)
    if qc:  # checked before the network runs: the bundle's cohort reference, of its own taxonomy
        from custom.solf.reference import load as load_reference

        qc_reference = load_reference(folder / "models" / "qc_reference.json", bundle)

    from custom.bundle_utils import inference_datalist

    items = inference_datalist(input_path)
    if len(items) != 1:
        raise InputError(input_path, f"holds {len(items)} volumes; segment takes one",
                         "give one image file or one DICOM series folder (run the bundle's inference.json for many)")

    with tempfile.TemporaryDirectory(prefix=".segment.", dir=output.parent) as tmp:
        ckpt_dir = Path(tmp) / "models"
        ckpt_dir.mkdir()
        os.symlink(ckpt, ckpt_dir / "model.pt")
        run_overrides = {
            "bundle_root": str(folder),
            "input_path": str(input_path),
            "output_dir": str(Path(tmp) / "out"),
            "ckpt_dir": str(ckpt_dir),
            "device": f"$torch.device('{'cuda:0' if device == 'cuda' else 'cpu'}')",
            "use_etta": bool(etta),
            **dict(overrides or {}),
        }
        _log(f"{folder.name} on {input_path.name} ({device}{', ETTA' if etta else ''})")
        from monai.bundle import run

        logging_conf = folder / "configs" / "logging.conf"
        run(config_file=str(config_file), meta_file=str(folder / "configs" / "metadata.json"),
            logging_file=str(logging_conf) if logging_conf.is_file() else None, **run_overrides)
        written = sorted((Path(tmp) / "out").rglob("*.nii.gz"))
        if len(written) != 1:
            raise RuntimeError(f"expected one label map from {folder.name}, found {[p.name for p in written]}")
        qc_result, image = None, None
        if stats or qc:
            from custom.io import load_image_checked

            image = np.asarray(load_image_checked(input_path))
        if qc:  # per-scan QC against the bundle's reference: <output stem>_qc.json and _qc.png beside the output
            import nibabel as nib

            from custom.solf.qc import write_case

            seg = nib.load(str(written[0]))
            qc_result = write_case(output, np.asarray(seg.dataobj), seg.affine, qc_reference, image, bundle,
                                   extra={"input": str(input_path), "bundle": folder.name, "etta": bool(etta)})
        if stats:
            table = label_stats(written[0], image, BUNDLES[bundle][1], qc_result)
            with atomic_path(stats_path(output)) as tmp_json:
                tmp_json.write_text(json.dumps(table, indent=4) + "\n")
        os.replace(written[0], output)
    _log(f"wrote {output}" + (f" and {stats_path(output).name}" if stats else ""))
    return output


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@cli_main
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m custom.segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--input", required=True, help="NIfTI/NRRD/MHA file or DICOM series folder")
    parser.add_argument("-o", "--output", required=True, help="label map to write (.nii.gz)")
    parser.add_argument("--bundle", choices=sorted(BUNDLES), default="btcv", help="which Swin-BOB bundle (default btcv)")
    parser.add_argument("--etta", action="store_true", help="entropy test-time adaptation (the bundle's use_etta)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--stats", action="store_true", help="also write per-organ statistics (TotalSegmentator statistics.json format)")
    parser.add_argument("--qc", action="store_true", help="per-organ QC against the bundle's models/qc_reference.json: OUTPUT stem + _qc.json / _qc.png")
    parser.add_argument("--model", help="weights to use instead of the bundle's models/model.pt")
    parser.add_argument("--bundles_root", help=argparse.SUPPRESS)
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="inference.json overrides, e.g. sw_batch_size=2 (as monai.bundle run takes them)")
    args = parser.parse_args(argv)
    return segment(args.input, args.output, bundle=args.bundle, etta=args.etta, device=args.device, stats=args.stats,
                   model=args.model, bundles_root=args.bundles_root, overrides=parse_overrides(args.override), qc=args.qc)


if __name__ == "__main__":
    main()
