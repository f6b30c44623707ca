"""Small pieces the bundle configs need and MONAI does not provide.

- :func:`screen_datalist`: drop (and report in ``errors.csv``) the unusable files of a batch.
- :func:`inference_datalist`: turn what a user passes as ``--input_path`` (a NIfTI file, a DICOM
  series folder, a folder of images, a Decathlon ``dataset.json`` or a dataset folder holding one)
  into ``[{"image": path}, ...]``, with one-line :class:`~custom.errors.InputError` for bad paths.
- :class:`HausdorffDistanceMM`: MONAI's Hausdorff metric with the voxel spacing taken from each
  label's affine, so HD95 is in millimetres (MONAI's ignite handler passes no spacing).
- :class:`OrganMetricsWriter`: an ignite handler that writes per-case, per-organ metric values with
  organ names (one tidy CSV) plus per-organ means, atomically.
- :class:`InputErrorHandler`: lets a bad input file end an engine run with its one-line message
  instead of a logged traceback.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import HausdorffDistanceMetric

from custom.atomic import atomic_write_text, check_writable_dir
from custom.checks import IMAGE_SUFFIXES, NIFTI_SUFFIXES, case_name, check_image, check_readable, source_names
from custom.errors import InputError, find_input_error
from custom.labels import TAXONOMIES
from custom.transforms import load_image_checked



def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def _check_header(path: Path) -> None:
    """Cheap check that a NIfTI file is an image (reads the header only, not the voxels)."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for "not NIfTI"
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(path, f"is not a readable NIfTI image ({detail})", "give a NIfTI file or a DICOM series folder") from None
    if len(img.shape) < 3:
        raise InputError(path, f"is not a 3D volume (shape {img.shape})", "give a 3D image")


def _datalist_json(path: Path, key: str) -> list[dict[str, str]]:
    from monai.data import load_decathlon_datalist

    try:
        items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key)
    except (ValueError, KeyError) as exc:
        raise InputError(path, f"has no usable '{key}' list ({exc})", "give a Decathlon-style dataset.json") from None
    return [{"image": item["image"]} for item in items]


def inference_datalist(path: str | os.PathLike, key: str = "test", check: bool = True) -> list[dict[str, str]]:
    """The inference datalist for ``path``.

    ``path`` may be: a NIfTI/NRRD/MHA file -> one case; a folder of DICOM files -> one case read as a
    series (MONAI's ``ITKReader``); a folder of image files -> one case each, sorted; a Decathlon
    ``dataset.json`` (or a folder holding one) -> its ``key`` list (default ``"test"``).

    Returns ``[{"image": absolute path}, ...]``. With ``check`` and a single input its NIfTI header
    is read, so a file that is not an image fails here with one line instead of deep inside the data
    loader; a batch is left whole for ``custom.bundle_utils.screen_datalist``, which skips and reports bad items.
    Raises :class:`~custom.errors.InputError` for a missing, empty or unusable path.
    """
    path = check_readable(Path(path).expanduser().resolve())
    if path.is_file():
        items = _datalist_json(path, key) if path.suffix == ".json" else [{"image": str(path)}]
    elif (path / "dataset.json").is_file():
        items = _datalist_json(path / "dataset.json", key)
    else:
        images = sorted(p for p in path.iterdir() if _is_image_file(p))
        if images:
            items = [{"image": str(p)} for p in images]
        elif any(p.is_file() for p in path.iterdir()):
            items = [{"image": str(path)}]  # a DICOM series: the reader finds the files
        else:
            raise InputError(path, "holds no image files and no DICOM series", "give a NIfTI file or a DICOM series folder")
    if not items:
        raise InputError(path, f"the '{key}' list is empty", "add cases or pass one image file")
    # one input: fail here with its one line; several: custom.bundle_utils.screen_datalist skips and reports each bad one
    if check and len(items) == 1:
        for item in items:
            image = check_readable(item["image"])
            if image.is_file():
                _check_header(image)
    return items


# ---------------------------------------------------------------- metrics
def screen_datalist(
    items: Sequence[Mapping[str, Any]],
    key: str = "image",
    channels: int | None = None,
    report_dir: str | os.PathLike | None = None,
) -> list[Mapping[str, Any]]:
    """Drop the items whose ``key`` file cannot be used, so that a batch goes on past a bad file.

    One item: returned as it is (nothing read twice; a bad file fails in the pipeline with its one
    line and exit 2). Several items: each file is loaded and checked
    (:func:`custom.transforms.load_image_checked`, :func:`custom.checks.check_image` with ``channels``);
    a bad one prints ``skipped: FILE: problem. Fix: ...`` on stderr and becomes a row of
    ``<report_dir>/errors.csv`` (``file,error``). Raises :class:`InputError` when no item is left.
    """
    items = list(items)
    if len(items) <= 1:
        return items
    kept, errors = [], []
    for item in items:
        try:
            check_image(load_image_checked(item[key]), path=str(item[key]), channels=channels)
        except InputError as err:
            print(f"skipped: {err}", file=sys.stderr, flush=True)
            errors.append((str(item[key]), str(err)))
        else:
            kept.append(item)
    if errors and report_dir is not None:
        atomic_write_text(Path(report_dir) / "errors.csv", _csv([("file", "error"), *errors]))
    if not kept:
        raise InputError(None, f"none of the {len(items)} inputs can be used (see the lines above)", "fix or remove the listed files")
    return kept


def voxel_spacing(image: torch.Tensor) -> list[float] | None:
    """Voxel sizes (mm) from a MetaTensor's affine; ``None`` for a plain tensor."""
    affine = getattr(image, "affine", None)
    if affine is None:
        return None
    affine = torch.as_tensor(affine, dtype=torch.float64)
    affine = affine[0] if affine.ndim == 3 else affine
    return torch.linalg.norm(affine[:3, :3], dim=0).tolist()


class HausdorffDistanceMM(HausdorffDistanceMetric):
    """``monai.metrics.HausdorffDistanceMetric`` in millimetres.

    ``y_pred`` and ``y`` are one-hot ``(B, C, H, W, D)``; the spacing comes from ``y``'s affine
    (a MetaTensor, as after ``LoadImaged``/``Invertd``) unless ``spacing=`` is given. Use it with
    ``monai.handlers.IgniteMetricHandler(metric_fn=...)``. Classes missing from the prediction or the
    reference give NaN (MONAI's behaviour), which the means skip.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if kwargs.get("spacing") is None:
            kwargs["spacing"] = voxel_spacing(y)
        return super()._compute_tensor(y_pred, y, **kwargs)


class OrganMetricsWriter:
    """Ignite handler: per-case, per-organ metric values as CSV, with organ names.

    At the end of the run it reads ``engine.state.metric_details`` (``(cases, classes)`` arrays that
    MONAI metric handlers fill when ``save_details=True``) and writes to ``output_dir``:

    - ``metrics_per_case.csv``: one row per case and organ: ``case, organ_id, organ, <metric>...``
    - ``metrics_summary.csv``: one row per organ with the mean over cases (NaN skipped) and the
      number of cases with a value, then a ``mean`` row over organs.

    Args:
        output_dir: folder for the CSVs (created).
        taxonomy: key of :data:`custom.labels.TAXONOMIES` that names the classes.
        metric_names: the metric keys to write (default: every key in ``metric_details``), or a
            mapping ``{metric key: CSV column name}`` (e.g. ``{"val_mean_dice": "dice"}``).
        include_background: whether the metric arrays include class 0.
        image_key: batch key whose metadata names the case.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        taxonomy: str,
        metric_names: Sequence[str] | Mapping[str, str] | None = None,
        include_background: bool = False,
        image_key: str = "image",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.labels = dict(TAXONOMIES[taxonomy].output_channels)
        if metric_names is not None and not isinstance(metric_names, Mapping):
            metric_names = {k: k for k in metric_names}
        self.metric_names = dict(metric_names) if metric_names is not None else None
        self.first_class = 0 if include_background else 1
        self.image_key = image_key
        self.cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.cases = []

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, Sequence) else [batch]  # MONAI engines decollate by default
        for item in items:
            names = _source_names(item.get(self.image_key) if isinstance(item, Mapping) else None)
            self.cases.extend(names or [f"case_{len(self.cases)}"])

    def rows(self, details: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
        """(header, rows) of the per-case table from ``{metric: (cases, classes) array}``."""
        names = self.metric_names or {k: k for k in sorted(details)}
        arrays = {k: np.asarray(torch.as_tensor(details[k]).cpu(), dtype=float) for k in names}
        n_cases, n_classes = next(iter(arrays.values())).shape
        header = ["case", "organ_id", "organ", *names.values()]
        rows = []
        for i in range(n_cases):
            case = self.cases[i] if i < len(self.cases) else f"case_{i}"
            for c in range(n_classes):
                organ_id = c + self.first_class
                rows.append([case, organ_id, self.labels.get(organ_id, str(organ_id)), *(arrays[k][i, c] for k in names)])
        return header, rows

    def _write(self, engine: Engine) -> None:
        details = engine.state.metric_details
        order = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # MONAI gathers every rank's metric values, rank by rank: gather the case names the same way
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, self.cases)
            if torch.distributed.get_rank() != 0:
                return
            self.cases = [case for cases in per_rank for case in cases]
            # DistributedSampler(shuffle=False) deals dataset case i to rank i % world: back to dataset order
            order = [r + j * len(per_rank) for r, cases in enumerate(per_rank) for j in range(len(cases))]
        if not details:
            return
        header, rows = self.rows(details)
        if order is not None:
            n_classes = len(rows) // max(len(order), 1)
            blocks = [rows[i * n_classes : (i + 1) * n_classes] for i in range(len(order))]
            rows = [row for _, block in sorted(zip(order, blocks), key=lambda pair: pair[0]) for row in block]
        check_writable_dir(self.output_dir)
        atomic_write_text(self.output_dir / "metrics_per_case.csv", _csv([header, *rows]))
        atomic_write_text(self.output_dir / "metrics_summary.csv", _csv(summarise(header, rows)))


def summarise(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Per-organ means over cases (NaN skipped) and a final ``mean`` row over organs."""
    metrics = list(header[3:])
    organs: dict[tuple[int, str], list[Sequence[Any]]] = {}
    for row in rows:
        organs.setdefault((row[1], row[2]), []).append(row)
    table: list[list[Any]] = [["organ_id", "organ", *metrics, "cases"]]
    per_organ = []
    for (organ_id, organ), group in organs.items():
        values = np.array([r[3:] for r in group], dtype=float)
        with np.errstate(invalid="ignore"):
            means = [float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for v in values.T]
        counted = int(np.isfinite(values[:, 0]).sum())
        per_organ.append(means)
        table.append([organ_id, organ, *means, counted])
    overall = np.array(per_organ, dtype=float)
    table.append(["", "mean", *(float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for v in overall.T), ""])
    return table


def _source_names(image: Any) -> list[str]:
    """Case names (file names without image suffix) of a MetaTensor's source files."""
    return [case_name(n) for n in source_names(image)]


def _csv(rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in row])
    return buf.getvalue()


# ---------------------------------------------------------------- engine helpers
class InputErrorHandler:
    """Ignite handler: when a run fails because of a bad input file, re-raise that
    :class:`~custom.errors.InputError` (one line) instead of the transform error that wraps it.

    Attach it first, so it runs before ``StatsHandler`` would log the full traceback; wrap the run in
    :func:`custom.errors.exit_on_input_error` to turn it into ``error: <line>`` and exit code 2. Any other
    exception is re-raised unchanged.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, exc: BaseException) -> None:
        err = find_input_error(exc)
        if err is not None:
            raise err from None
        raise exc
