"""Segment one volume or a whole cohort with a Swin-BOB bundle, in the manner of TotalSegmentator's command line.

    python -m custom.segment -i ct.nii.gz -o ct_seg.nii.gz --bundle btcv --stats
    python -m custom.segment -i dicom_series/ -o seg.nii.gz --bundle btcv --etta --device cuda   # or --tta (flips)
    python -m custom.segment -i images/ -o segs/ --bundle ukbob --workers 2           # a folder or dataset.json
    python -m custom.segment -i dataset.json -o segs/ --scheduler tcp://host:8786     # an existing Dask cluster

``INPUT`` is a NIfTI (or NRRD/MHA) file, a folder holding one DICOM series, a folder of image files or a
Decathlon ``dataset.json`` (its ``test`` list). The bundle's own ``configs/inference.json`` runs
underneath (:class:`custom.predict.BundlePredictor`: its pre-processing, sliding-window or ETTA
inferer and post-processing, parsed once and weights loaded once per process).

``OUTPUT`` ending in ``.nii.gz`` / ``.nii``: the label map of the one input (uint8, the input's grid
and affine); ending in ``.dcm`` with ``--output_type dicom_seg``: a DICOM-SEG of the input DICOM series
(:mod:`custom.dicom_seg`: one coded segment per organ, on the series' own frames). Otherwise a folder: one ``<case>_seg.nii.gz`` (or ``.dcm``) per case, cases whose outputs are already
complete are skipped (a re-run after a kill redoes only the cases in flight), bad inputs become rows of
``errors.csv`` and the run goes on. ``--workers N`` runs N local processes, ``--scheduler`` an
existing Dask cluster, through the same executor as the SOLF runner (:mod:`custom.parallel`), one model
load per worker. ``--stats`` also writes, per case, ``<case>_seg.json`` beside the label map, in
TotalSegmentator's ``statistics.json`` format (:mod:`custom.statistics`: per organ ``volume`` mm^3 and
``intensity``, plus ``volume_ml``, ``voxels``, ``partial``, ``qc``) and, for a folder,
``statistics.csv`` over the cohort. ``--qc`` judges every organ against the bundle's
``models/qc_reference.json`` (:mod:`custom.solf.qc`): ``<case>_seg_qc.json`` and ``_qc.png`` per case
and, for a folder, ``qc_flags.csv`` (per organ, how many cases got each verdict).

Bad input prints one line ``error: ...`` and exits with code 2 (for a folder: the case is recorded in
``errors.csv``); every file is written to a temporary name and renamed into place, so an output is
either complete or absent.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from custom.atomic import atomic_write_text, check_writable_dir
from custom.checks import case_name, check_readable
from custom.errors import InputError, cli_main, parse_overrides
from custom.labels import BRATS_LABELS, BTCV_LABELS, UKBOB_LABELS

REPO = Path(__file__).resolve().parents[1]
#: --bundle choice -> (bundle folder name, names of the label ids the bundle writes)
BUNDLES: Mapping[str, tuple[str, Mapping[int, str]]] = {
    "btcv": ("swin_bob_btcv", BTCV_LABELS),
    "ukbob": ("swin_bob_ukbob", UKBOB_LABELS),
    "brats": ("swin_bob_brats", BRATS_LABELS),  # the bundle writes BraTS 2023 ids 1 NCR, 2 ED, 3 ET
}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_SUFFIXES = {"nifti": ".nii.gz", "dicom_seg": ".dcm"}
ERRORS_CSV, STATISTICS_CSV = "errors.csv", "statistics.csv"


def _log(msg: str) -> None:
    print(f"[segment] {msg}", file=sys.stderr, flush=True)


def stats_path(output: str | os.PathLike) -> Path:
    """``seg.nii.gz`` (or ``seg.dcm``) -> ``seg.json``."""
    output = Path(output)
    name = output.name
    for suffix in (*NIFTI_SUFFIXES, ".dcm"):
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


def check_model(folder: Path, ckpt: Path, device: str, etta: bool) -> None:
    """What can be checked before a network is built; :class:`InputError` otherwise."""
    if not ckpt.is_file():
        raise InputError(ckpt, "model weights not found",
                         "train the bundle (configs/train.json), fetch the files in large_files.yml, or pass --model PATH")
    if etta and "use_etta" not in json.loads((folder / "configs" / "inference.json").read_text()):
        raise InputError(None, "--etta: this bundle's inference.json has no `use_etta` switch", "run without --etta")
    if device.startswith("cuda"):
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


def qc_reference_path(spec: Any) -> Path:
    """The bundle's cohort reference for ``--qc``, loaded once here so a bad or missing one fails before
    any network runs (:class:`InputError`)."""
    from custom.solf.reference import load as load_reference

    path = Path(spec.folder) / "models" / "qc_reference.json"
    load_reference(path, _bundle_key(spec))
    return path


def _bundle_key(spec: Any) -> str:
    return next(key for key, (folder, _) in BUNDLES.items() if folder == Path(spec.folder).name)


# ---------------------------------------------------------------- one case, in whichever process runs it
@functools.lru_cache(maxsize=1)
def _predictor(spec: Any, output_dir: str) -> Any:
    """This process's predictor for ``spec`` (built on first use: one model load per worker)."""
    from custom.predict import BundlePredictor, staging_folder

    return BundlePredictor(spec, staging_folder(output_dir))


def segment_case(spec: Any, output_dir: str, image: str, output: str, stats: bool = False, bundle: str = "btcv",
                 output_type: str = "nifti", qc_reference: str | None = None) -> dict[str, Any]:
    """Segment ``image`` into ``output`` (and its stats JSON) with this process's predictor.

    ``output_type="dicom_seg"``: ``image`` must be a DICOM series folder; ``output`` is its DICOM-SEG.
    ``qc_reference``: a cohort reference file; the case's QC goes to ``<output stem>_qc.json`` / ``.png``.

    Returns ``{"image", "output", "seconds"}``, or with ``"error"`` (one line) when the input is bad.
    The label map is renamed into place last, so its presence means the case is complete.
    """
    start = time.perf_counter()
    try:
        if output_type == "dicom_seg":
            from custom.dicom_seg import check_request

            check_request(image, output)
        staged = _predictor(spec, output_dir).predict(image)
        qc = None
        if stats or qc_reference:
            from custom.transforms import load_image_checked

            pixels = np.asarray(load_image_checked(image))
        if qc_reference:
            import nibabel as nib

            from custom.solf.qc import write_case
            from custom.solf.reference import load as load_reference

            seg = nib.load(str(staged))
            qc = write_case(output, np.asarray(seg.dataobj), seg.affine, load_reference(qc_reference, bundle), pixels, bundle,
                            extra={"input": str(image), "bundle": Path(spec.folder).name, "etta": bool(spec.etta)})
        if stats:
            from custom.statistics import write_statistics

            write_statistics(stats_path(output), label_stats(staged, pixels, BUNDLES[bundle][1], qc))
        if output_type == "dicom_seg":
            from custom.dicom_seg import bundle_version, nifti_to_dicom_seg

            folder = Path(spec.folder)
            nifti_to_dicom_seg(staged, image, output, BUNDLES[bundle][1], algorithm=folder.name,
                               version=bundle_version(folder / "configs" / "metadata.json"))
            staged.unlink()
        else:
            os.replace(staged, output)
    except Exception as exc:  # noqa: BLE001 - a bad case is reported, the cohort goes on
        from custom.errors import find_input_error

        err = find_input_error(exc)
        if err is not None:
            return {"image": image, "output": output, "error": str(err), "bad_input": True}
        return {"image": image, "output": output, "error": f"{type(exc).__name__}: {exc}", "bad_input": False,
                "traceback": traceback.format_exc()}
    return {"image": image, "output": output, "seconds": time.perf_counter() - start, "qc": qc}


@dataclass(frozen=True)
class SegmentOptions:
    """What :func:`segment` and :func:`segment_cohort` take as keyword arguments besides their paths.

    Attributes:
        bundle: ``btcv``, ``ukbob`` or ``brats`` (a key of :data:`BUNDLES`).
        etta: entropy test-time adaptation (the bundle's ``use_etta``).
        device: ``cpu`` or ``cuda`` (``None``: cuda when available).
        stats: also write per-organ statistics (``<case>.json``, TotalSegmentator's format).
        model: weights instead of the bundle's ``models/model.pt``.
        bundles_root: the folder holding the bundles (default the repository's ``bundles/``).
        overrides: ``inference.json`` overrides, as ``monai.bundle run`` takes them.
        output_type: ``nifti`` or ``dicom_seg`` (a DICOM-SEG of each input DICOM series).
        qc: per-organ QC against the bundle's ``models/qc_reference.json``.
    """

    bundle: str = "btcv"
    etta: bool = False
    device: str | None = None
    stats: bool = False
    model: str | os.PathLike | None = None
    bundles_root: str | os.PathLike | None = None
    overrides: Mapping[str, Any] | None = field(default=None, hash=False)
    output_type: str = "nifti"
    qc: bool = False


def _spec(o: SegmentOptions) -> Any:
    from custom.predict import BundleSpec

    folder = bundle_dir(o.bundle, o.bundles_root)
    ckpt = Path(o.model).expanduser().resolve() if o.model else folder / "models" / "model.pt"
    device = o.device or ("cuda" if _cuda() else "cpu")
    check_model(folder, ckpt, device, o.etta)
    return BundleSpec(str(folder), str(ckpt), "cuda:0" if device == "cuda" else device, bool(o.etta), BundleSpec.freeze(o.overrides))


def segment(input_path: str | os.PathLike, output: str | os.PathLike, **options: Any) -> Path:
    """Run the bundle's inference.json on one volume; write ``output`` (and its stats / QC); return it.

    ``options``: the fields of :class:`SegmentOptions`. ``output_type="dicom_seg"``: ``input_path``
    must be a DICOM series folder and ``output`` a ``.dcm`` file; the label map is written as a
    DICOM-SEG of that series (``custom.dicom_seg``)."""
    from custom.bundle_utils import inference_datalist

    o = SegmentOptions(**options)

    input_path, output = Path(input_path).expanduser().resolve(), Path(output).expanduser().resolve()
    check_readable(input_path)
    if output.is_dir():
        raise InputError(output, "is a folder", "give a file name such as seg.nii.gz, or a folder name for many cases")
    if o.output_type == "nifti" and not output.name.endswith(NIFTI_SUFFIXES):
        raise InputError(output, "the output must be a NIfTI file name", "end it with .nii.gz (or use --output_type dicom_seg)")
    check_writable_dir(output.parent)
    if o.output_type == "dicom_seg":
        from custom.dicom_seg import check_request

        check_request(input_path, output)  # a series folder in, .dcm out, before any network runs
    spec = _spec(o)
    reference = str(qc_reference_path(spec)) if o.qc else None
    items = inference_datalist(input_path)
    if len(items) != 1:
        raise InputError(input_path, f"holds {len(items)} volumes; a .nii.gz output takes one",
                         "give an output folder instead (-o OUTDIR) to segment them all")
    _log(f"{Path(spec.folder).name} on {input_path.name} ({spec.device}{', ETTA' if o.etta else ''})")
    try:
        result = segment_case(spec, str(output.parent), items[0]["image"], str(output), o.stats, o.bundle, o.output_type, reference)
    finally:
        _predictor.cache_clear()
        _remove_staging(output.parent)
    if "error" in result:
        if result["bad_input"]:
            raise InputError(None, result["error"])
        raise RuntimeError(f"{result['error']}\n{result['traceback']}")
    written = [output.name] + [stats_path(output).name] * o.stats
    if o.qc:
        from custom.solf.qc import qc_paths

        written.append(f"{qc_paths(output)[0].name} ({_flag_summary(result['qc'])})")
    _log(f"wrote {', '.join(written)} in {output.parent} ({result['seconds']:.1f} s)")
    return output


# ---------------------------------------------------------------- a cohort
def _remove_staging(output_dir: Path) -> None:
    for leftover in output_dir.glob(".staging.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _is_complete(output: Path, stats: bool, qc: bool) -> bool:
    from custom.solf.qc import qc_paths

    return output.is_file() and (not stats or stats_path(output).is_file()) and (not qc or qc_paths(output)[0].is_file())


def _flag_summary(qc: Mapping[str, Any] | None) -> str:
    from custom.solf.qc import flagged_organs

    flagged = flagged_organs(qc or {"organs": {}})
    return f"{len(flagged)} organ(s) flagged" if flagged else "no organ flagged"


def segment_cohort(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    workers: int = 1,
    scheduler: str | None = None,
    quiet: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Segment every case of ``input_path`` into ``output_dir``; skip complete cases; report bad ones.

    ``options``: the fields of :class:`SegmentOptions`, as for :func:`segment`.

    Returns ``{"done": n segmented now, "skipped": n already complete, "errors": [rows], "outputs": [...]}``.
    ``workers`` <= 1 and no ``scheduler``: in this process; otherwise through :class:`custom.parallel.Executor`
    (``quiet``: its local workers log nothing below ERROR).
    """
    from custom.bundle_utils import inference_datalist

    o = SegmentOptions(**options)
    output_dir = check_writable_dir(Path(output_dir).expanduser().resolve())
    spec = _spec(o)
    reference = str(qc_reference_path(spec)) if o.qc else None
    items = inference_datalist(Path(input_path).expanduser().resolve(), check=False)
    cases: dict[str, str] = {}
    for item in items:
        name = case_name(item["image"])
        if name in cases:
            raise InputError(item["image"], f"two inputs are named {name!r} ({cases[name]})", "give each case a distinct file name")
        cases[name] = item["image"]
    outputs = {name: output_dir / f"{name}_seg{OUTPUT_SUFFIXES[o.output_type]}" for name in cases}
    todo = [name for name in cases if not _is_complete(outputs[name], o.stats, o.qc)]
    _remove_staging(output_dir)  # what a killed run left half-done
    _log(f"{Path(spec.folder).name} on {len(cases)} case(s) ({spec.device}{', ETTA' if o.etta else ''}): "
         f"{len(cases) - len(todo)} already done, {len(todo)} to segment")

    args = [(spec, str(output_dir), cases[name], str(outputs[name]), o.stats, o.bundle, o.output_type, reference) for name in todo]
    errors: list[dict[str, Any]] = []
    finished = 0
    try:
        if scheduler or workers > 1:
            from custom.parallel import Executor

            with Executor(workers, scheduler, start_method="spawn", quiet=quiet) as executor:
                futures = [executor.submit(segment_case, *a) for a in args]
                for future in executor.as_completed(futures):
                    finished += 1
                    _report(future.result(), finished, len(todo), errors)
        else:
            for a in args:
                finished += 1
                _report(segment_case(*a), finished, len(todo), errors)
    finally:
        _predictor.cache_clear()
        _remove_staging(output_dir)
    _write_errors(output_dir, errors)
    if o.stats:
        _write_statistics(output_dir, {name: stats_path(outputs[name]) for name in cases})
    if o.qc:
        from custom.solf.qc import qc_paths

        _write_qc_flags(output_dir, {name: qc_paths(outputs[name])[0] for name in cases})
    done = finished - len(errors)
    _log(f"{done} segmented, {len(cases) - len(todo)} skipped, {len(errors)} failed" +
         (f" (see {output_dir / ERRORS_CSV})" if errors else "") + f"; outputs in {output_dir}")
    return {"done": done, "skipped": len(cases) - len(todo), "errors": errors,
            "outputs": [str(outputs[n]) for n in cases if outputs[n].is_file()]}


def _report(result: Mapping[str, Any], i: int, n: int, errors: list[dict[str, Any]]) -> None:
    name = case_name(result["image"])
    if "error" in result:
        errors.append({"case": name, "image": result["image"], "error": result["error"], "bad_input": result["bad_input"]})
        _log(f"{i}/{n} {name}: failed: {result['error']}")
        if not result["bad_input"]:
            print(result["traceback"], file=sys.stderr, flush=True)
    else:
        _log(f"{i}/{n} {name}: {result['seconds']:.1f} s" + (f", {_flag_summary(result['qc'])}" if result["qc"] else ""))


def _write_errors(output_dir: Path, errors: Sequence[Mapping[str, Any]]) -> None:
    """``errors.csv`` lists this run's failed cases; absent when none failed."""
    path = output_dir / ERRORS_CSV
    if not errors:
        path.unlink(missing_ok=True)
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["case", "image", "error"], lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(errors, key=lambda r: r["case"]))
    atomic_write_text(path, buf.getvalue())


def _write_statistics(output_dir: Path, stats_files: Mapping[str, Path]) -> None:
    """``statistics.csv``: one row per case and organ present (``case, structure, voxels, volume_ml,
    intensity, partial, qc``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = ["voxels", "volume_ml", "intensity", "partial", "qc"]
    writer.writerow(["case", "structure", *columns])
    for name, path in sorted(stats_files.items()):
        if path.is_file():
            for organ, entry in json.loads(path.read_text()).items():
                if entry["voxels"]:
                    writer.writerow([name, organ, *(entry[c] for c in columns)])
    atomic_write_text(output_dir / STATISTICS_CSV, buf.getvalue())


def _write_qc_flags(output_dir: Path, qc_files: Mapping[str, Path]) -> None:
    """``qc_flags.csv``: per organ, how many cases got each QC verdict (:func:`custom.solf.qc.flag_table`)."""
    from custom.solf.qc import flag_table

    cases = {name: json.loads(path.read_text()) for name, path in qc_files.items() if path.is_file()}
    atomic_write_text(output_dir / "qc_flags.csv", flag_table(cases).to_csv(index=False))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _quiet(verbose: bool) -> None:
    """Without ``--verbose`` only this command's lines reach the terminal (no MONAI/ignite logging or warnings)."""
    if verbose:
        return
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


@cli_main
def main(argv: Sequence[str] | None = None) -> Path | dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m custom.segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--input", required=True, help="image file, DICOM series folder, folder of images or dataset.json")
    parser.add_argument("-o", "--output", required=True, help="label map (.nii.gz) for one input, or an output folder")
    parser.add_argument("--bundle", choices=sorted(BUNDLES), default="btcv", help="which Swin-BOB bundle (default btcv)")
    parser.add_argument("--etta", action="store_true", help="entropy test-time adaptation (the bundle's use_etta)")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation (the bundle's use_tta)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--stats", action="store_true", help="also write per-organ statistics (TotalSegmentator statistics.json format)")
    parser.add_argument("--qc", action="store_true", help="per-organ QC against the bundle's models/qc_reference.json: <case>_qc.json / _qc.png")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes for a folder (default 1: this process)")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--model", help="weights to use instead of the bundle's models/model.pt")
    parser.add_argument("--output_type", choices=sorted(OUTPUT_SUFFIXES), default="nifti",
                        help="dicom_seg: a DICOM-SEG (.dcm) of each input DICOM series (default nifti)")
    parser.add_argument("--verbose", action="store_true", help="show MONAI's and the libraries' own log lines and warnings")
    parser.add_argument("--bundles_root", help=argparse.SUPPRESS)
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="inference.json overrides, e.g. sw_batch_size=2 (as monai.bundle run takes them)")
    args = parser.parse_args(argv)
    _quiet(args.verbose)
    overrides = {**({"use_tta": True} if args.tta else {}), **parse_overrides(args.override)}
    kwargs = dict(bundle=args.bundle, etta=args.etta, device=args.device, stats=args.stats, model=args.model,
                  bundles_root=args.bundles_root, overrides=overrides, output_type=args.output_type, qc=args.qc)
    if args.output.endswith((*NIFTI_SUFFIXES, ".dcm")):
        if args.workers > 1 or args.scheduler:
            raise InputError(args.output, "--workers/--scheduler need an output folder", "give -o a folder name")
        return segment(args.input, args.output, **kwargs)
    result = segment_cohort(args.input, args.output, workers=args.workers, scheduler=args.scheduler,
                            quiet=not args.verbose, **kwargs)
    if any(not e["bad_input"] for e in result["errors"]):
        raise SystemExit(1)
    return result


def cli() -> None:
    """Console entry point: :func:`main` without its return value (a console script exits with it)."""
    main()


if __name__ == "__main__":
    cli()
