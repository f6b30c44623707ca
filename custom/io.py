"""Safe file handling shared by the bundles, SOLF and the command-line tools.

- :class:`InputError`: a bad user file, reported as one line ``FILE: problem. Fix: what to do``.
- ``atomic_*``: every output is written to a temporary file in the same folder and renamed into
  place, so a path is either absent or complete, never half-written.
- :class:`AtomicNibabelWriter`: MONAI's NIfTI writer with that guarantee, for ``SaveImage(d)``;
  :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` with it.
- :class:`SafeLoadImaged`: ``LoadImaged`` whose failures name the file in one line.
- :func:`check_image` / :class:`CheckImaged`: reject unreadable, wrongly shaped, NaN or constant
  images before they reach a network; :class:`CheckLabeld` (ids outside the taxonomy) and
  :class:`CheckSameGridd` (a label not on its image's grid) for label maps.
- :func:`exit_on_input_error`: run a callable, turn an :class:`InputError` anywhere in the
  exception chain into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.handlers import CheckpointSaver
from monai.transforms import LoadImaged, MapTransform, Transform

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """A user-supplied file cannot be used. ``str()`` is one line: file, problem, fix."""

    def __init__(self, path: str | os.PathLike | None, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = (str(path) if path is not None else None), problem, fix
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}" + (f". Fix: {fix}" if fix else ""))


def find_input_error(exc: BaseException | None) -> InputError | None:
    """The first :class:`InputError` in ``exc``'s cause/context chain (MONAI wraps transform errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def exit_on_input_error(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``func``; on a bad input print ``error: <one line>`` to stderr and exit with code 2."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - we re-raise anything that is not a bad input
        err = find_input_error(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None


def cli_main(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of :func:`exit_on_input_error` for command-line entry points."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return exit_on_input_error(func, *args, **kwargs)

    return wrapper



def parse_overrides(items: Sequence[str], option: str = "--override", example: str = "sw_batch_size=2") -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` from a command line -> ``{KEY: value}``, each value parsed as YAML
    (``12`` -> int, ``[64,64,64]`` -> list, ``true`` -> bool). A malformed item is an :class:`InputError`."""
    import yaml

    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(None, f"{option} {item!r} is not KEY=VALUE", f"e.g. {option} {example}")
        result[key] = yaml.safe_load(value)
    return result

# ---------------------------------------------------------------- atomic writes
def _temp_name(path: Path) -> Path:
    # keep the full suffix (.nii.gz, .csv, ...) so writers that pick a format by extension still work
    suffix = "".join(path.suffixes) if path.suffixes else ""
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check we can write there; :class:`InputError` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(folder, f"cannot create the output folder ({exc.strerror})", "choose a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(folder, "the output folder is not writable", "choose a writable folder or fix its permissions")
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    check_writable_dir(path.parent)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IRGRP | stat.S_IROTH)  # mkstemp makes 0600; outputs are shared
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


class AtomicNibabelWriter(NibabelWriter):
    """``monai.data.NibabelWriter`` that writes to a temporary file and renames it into place.

    Use it as ``SaveImaged(..., writer="custom.io.AtomicNibabelWriter")``: an interrupted or failed
    save leaves no truncated ``.nii.gz`` behind.
    """

    def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)
        if verbose:
            print(f"wrote {filename}", flush=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) that writes each checkpoint atomically.

    MONAI turns ignite's atomic saving off (``DiskSaver(atomic=False)``) because ignite once left
    atomic files readable by their owner only; ignite 0.5 restores group/other read permission, so a
    killed run can again leave only complete ``model.pt`` / ``*_checkpoint_epoch=N.pt`` files.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True  # ignite's DiskSaver: temporary file, then os.replace


# ---------------------------------------------------------------- checks
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_readable(path: str | os.PathLike) -> Path:
    """Existence, type and non-emptiness of an input path (a file or a DICOM folder)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found", "check the path")
    if path.is_dir():
        if not any(path.iterdir()):
            raise InputError(path, "the folder is empty", "give a NIfTI file or a folder with a DICOM series")
        return path
    if path.stat().st_size == 0:
        raise InputError(path, "the file is empty (0 bytes)", "re-export or re-download it")
    return path


def _source_name(meta: Any) -> str | None:
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if isinstance(name, (list, tuple)):
            name = name[0] if name else None
        return None if name is None else str(name)
    return None


def check_image(
    image: Any, path: str | None = None, channels: int | None = None, allow_constant: bool = False
) -> None:
    """Raise :class:`InputError` for an image that must not reach a network.

    Args:
        image: channel-first array or tensor ``(C, H, W, D)``.
        path: file name for the message (taken from MONAI metadata when ``None``).
        channels: the channel count the model expects (``None``: any).
        allow_constant: accept a constant image (labels may be; images should not be).
    """
    path = path or _source_name(getattr(image, "meta", None))
    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if arr.ndim != 4:
        raise InputError(path, f"expected a 3D volume (channel-first 4D after loading), got shape {tuple(arr.shape)}", "give a 3D image")
    if channels is not None and arr.shape[0] != channels:
        raise InputError(
            path, f"the image has {arr.shape[0]} channel(s), the model needs {channels}", f"give a {channels}-channel image"
        )
    if arr.size == 0:
        raise InputError(path, "the image has no voxels", "give a non-empty image")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise InputError(path, f"the voxels are not numbers (dtype {arr.dtype})", "give a numeric image")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InputError(path, f"{bad} voxel(s) are NaN or infinite", "fix or mask them before segmenting")
    if not allow_constant and arr.min() == arr.max():
        raise InputError(path, f"the image is constant (every voxel = {arr.flat[0]})", "check the export; it holds no anatomy")


class CheckImage(Transform):
    """Array version of :class:`CheckImaged`: returns its input unchanged or raises :class:`InputError`."""

    def __init__(self, channels: int | None = None, allow_constant: bool = False):
        self.channels, self.allow_constant = channels, allow_constant

    def __call__(self, img: Any) -> Any:
        check_image(img, channels=self.channels, allow_constant=self.allow_constant)
        return img


class CheckImaged(MapTransform):
    """Validate loaded images (after ``LoadImaged`` + ``EnsureChannelFirstd``) before preprocessing.

    Input: a dict with channel-first images under ``keys``. Output: the same dict, unchanged.
    Raises :class:`InputError` (one line naming the source file) for a wrong channel count, NaN or
    infinite voxels, or a constant image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        channels: int | Sequence[int | None] | None = None,
        allow_constant: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        n = len(self.keys)
        self.channels = list(channels) if isinstance(channels, Sequence) else [channels] * n
        self.checkers = [CheckImage(c, allow_constant) for c in self.channels]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, checker in self.key_iterator(d, self.checkers):
            checker(d[key])
        return d


def check_label(label: Any, num_classes: int, extra_ids: Sequence[int] = (), path: str | None = None) -> None:
    """Raise :class:`InputError` unless ``label`` holds only integer ids ``0..num_classes-1`` (or ``extra_ids``).

    ``label``: channel-first ``(1, H, W, D)`` array or tensor (the file name comes from its metadata).
    """
    path = path or _source_name(getattr(label, "meta", None))
    arr = np.asarray(label.detach().cpu() if hasattr(label, "detach") else label)
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and np.array_equal(arr, np.rint(arr))):
        raise InputError(path, "the label map holds non-integer values", "save labels with an integer dtype (nearest-neighbour resampling)")
    ids = np.unique(arr).astype(np.int64)
    bad = [int(i) for i in ids if not (0 <= i < num_classes or i in extra_ids)]
    if bad:
        raise InputError(path, f"label id(s) {bad[:5]} are outside the taxonomy (0..{num_classes - 1})", "remap the labels to this bundle's ids")


class CheckLabeld(MapTransform):
    """Validate loaded label maps: integer ids within ``0..num_classes-1`` (plus ``extra_ids``).

    Input: a dict with channel-first label maps under ``keys``; output: the same dict, unchanged.
    Raises :class:`InputError` naming the label file; without it an id beyond the class count fails
    deep inside one-hot encoding with an index error.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, extra_ids: Sequence[int] = (), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes, self.extra_ids = num_classes, tuple(extra_ids)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_label(d[key], self.num_classes, self.extra_ids)
        return d


def check_same_grid(image: Any, label: Any, atol_mm: float = 1e-3) -> None:
    """Raise :class:`InputError` (naming the label file) when ``label`` is not on ``image``'s voxel grid.

    Both channel-first MetaTensors as loaded (before any resampling): same spatial shape and the same
    voxel-to-mm affine within ``atol_mm``.
    """
    path = _source_name(getattr(label, "meta", None))
    shape_i, shape_l = tuple(image.shape[1:]), tuple(label.shape[1:])
    aff_i = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
    aff_l = np.asarray(getattr(label, "affine", np.eye(4)), dtype=np.float64)
    if shape_i != shape_l or not np.allclose(aff_i, aff_l, atol=atol_mm):
        sp_i, sp_l = (np.round(np.linalg.norm(a[:3, :3], axis=0), 3).tolist() for a in (aff_i, aff_l))
        raise InputError(
            path, f"the label grid (shape {shape_l}, spacing {sp_l} mm) differs from the image's (shape {shape_i}, spacing {sp_i} mm)",
            "resample the label onto its image (nearest neighbour) or pair the right files",
        )


class CheckSameGridd(MapTransform):
    """Check that every key in ``keys`` is on the voxel grid of ``ref_key`` (after ``LoadImaged``).

    Input and output: the same dict, unchanged; :class:`InputError` naming the file otherwise.
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "image", atol_mm: float = 1e-3, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.atol_mm = ref_key, atol_mm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_same_grid(d[self.ref_key], d[key], self.atol_mm)
        return d


def load_image_checked(path: str | os.PathLike, reader: str | None = None) -> Any:
    """``monai.transforms.LoadImage`` (channel-first, with metadata) with one-line errors for bad files."""
    from monai.transforms import LoadImage

    path = check_readable(path)
    try:
        return LoadImage(reader=reader, image_only=True, ensure_channel_first=True)(str(path))
    except Exception as exc:  # noqa: BLE001 - readers raise many types; all mean "cannot read"
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(
            path, f"cannot be read as an image ({detail})",
            "give a NIfTI/NRRD file or a DICOM series folder; re-export it if it is truncated",
        ) from None


class SafeLoadImaged(LoadImaged):
    """``monai.transforms.LoadImaged`` (same arguments) whose failures name the file in one line.

    A truncated ``.nii.gz``, a file that is not an image or an empty file otherwise fails deep in a
    reader with a multi-line traceback that does not say which file; here each path is checked first
    and, when loading fails, the failing key's file is re-read with :func:`load_image_checked` to
    raise its :class:`InputError`. Input: ``{key: path}``; output: as ``LoadImaged``.
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        paths = [data[key] for key in self.key_iterator(dict(data)) if isinstance(data[key], (str, os.PathLike))]
        for path in paths:
            check_readable(path)
        try:
            return super().__call__(data, reader)
        except Exception:
            for path in paths:
                load_image_checked(path)  # raises the one-line InputError of the file that fails
            raise


def screen_datalist(
    items: Sequence[Mapping[str, Any]],
    key: str = "image",
    channels: int | None = None,
    report_dir: str | os.PathLike | None = None,
) -> list[Mapping[str, Any]]:
    """Drop the items whose ``key`` file cannot be used, so that a batch goes on past a bad file.

    One item: returned as it is (nothing read twice; a bad file fails in the pipeline with its one
    line and exit 2). Several items: each file is loaded and checked (:func:`load_image_checked`,
    :func:`check_image` with ``channels``); a bad one prints ``skipped: FILE: problem. Fix: ...`` on
    stderr and becomes a row of ``<report_dir>/errors.csv`` (``file,error``). Raises
    :class:`InputError` when no item is left.
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
        import csv
        import io

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([("file", "error"), *errors])
        atomic_write_text(Path(report_dir) / "errors.csv", buf.getvalue())
    if not kept:
        raise InputError(None, f"none of the {len(items)} inputs can be used (see the lines above)", "fix or remove the listed files")
    return kept
