"""Small MONAI transforms that MONAI itself has no component for.

Safe loading and input checks (the MONAI side of :mod:`custom.checks`): :class:`SafeLoadImaged`
(``LoadImaged`` whose failures name the file in one line), :class:`CheckImage(d)` (wrong channel
count, NaN, constant images), :class:`CheckLabeld` (ids outside the taxonomy), :class:`CheckSameGridd`
(a label not on its image's grid), and :class:`AtomicNibabelWriter` for ``SaveImage(d)``.

Left-right flip that swaps paired labels (``docs/labels.md``, left/right pairs): flipping a body left-right without
relabelling teaches the network that the left kidney is on the right. :class:`FlipSwapLR` flips the
image with ``monai.transforms.Flip`` (metadata and applied-operation tracking included) and maps each
left id to its right id and back. Lung lobes have no one-to-one partner (2 left, 3 right lobes), so a
label map that contains lobes is either not flipped (``lung_policy="skip"``, default) or flipped
with its lobes set to the ignore value that the loss masks (``"ignore"``).

BraTS 2023 labels (1 NCR, 2 ED, 3 ET) to the three nested sigmoid regions TC / WT / ET and back:
:class:`BratsLabelToRegions(d)` and :class:`BratsRegionsToLabel(d)` (MONAI's
``ConvertToMultiChannelBasedOnBratsClasses`` uses the 2021 ET id 4).

:class:`SafeSpacingd`: ``Spacingd`` that survives the plain ``image_path`` entry MONAI Label puts in
every request (MONAI 1.6 takes it for a metadata dict).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.transforms import Flip, LoadImage, LoadImaged, MapTransform, RandomizableTransform, Spacingd, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor

from custom.atomic import atomic_path
from custom.checks import check_image, check_label, check_readable, check_same_grid, source_name
from custom.errors import InputError
from custom.labels import BRATS_LABELS, BRATS_REGIONS, IGNORE_LABEL, UKBOB_LR_PAIRS, UKBOB_LUNG_LOBE_IDS

LUNG_POLICIES = ("skip", "ignore", "error")


class ArrayTwind(MapTransform):
    """Dictionary twin of an array transform: each of ``keys`` replaced by ``self.transform(d[key])``.

    A subclass builds ``self.transform`` (the array version) in ``__init__``. Input and output: a dict.
    """

    transform: Callable[[Any], Any]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


def swap_table(pairs: Sequence[tuple[int, int]], size: int = 256) -> torch.Tensor:
    """Lookup table id -> id with each (left, right) pair exchanged; all other ids unchanged."""
    table = torch.arange(size)
    for left, right in pairs:
        table[left], table[right] = right, left
    return table


class FlipSwapLR(Transform):
    """Flip a label map left-right and swap its paired left/right ids.

    Input: channel-first label map ``(1, H, W, D)`` (tensor, MetaTensor or NumPy) in an orientation
    where ``spatial_axis`` is left-right (axis 0 after ``Orientationd(axcodes="RAS")``).
    Output: the flipped, relabelled map (same type). Raises ``ValueError`` when the map contains an
    id of ``unpaired_ids`` (lung lobes) and ``unpaired="error"``; with ``"ignore"`` those voxels
    become ``ignore_value``. An id outside ``0..max(255, ignore_value)`` raises
    :class:`custom.errors.InputError`.
    """

    def __init__(
        self,
        spatial_axis: int = 0,
        pairs: Sequence[tuple[int, int]] = UKBOB_LR_PAIRS,
        unpaired_ids: frozenset[int] | set[int] = UKBOB_LUNG_LOBE_IDS,
        unpaired: str = "error",
        ignore_value: int = IGNORE_LABEL,
    ):
        if unpaired not in ("error", "ignore"):
            raise ValueError(f"unpaired must be 'error' or 'ignore', got {unpaired!r}")
        self.flip = Flip(spatial_axis=spatial_axis)
        self.table = swap_table(pairs, size=max(256, ignore_value + 1))
        if unpaired == "ignore":
            for i in unpaired_ids:
                self.table[i] = ignore_value
        self.unpaired_ids, self.unpaired = tuple(unpaired_ids), unpaired

    def has_unpaired(self, label: Any) -> bool:
        lab = torch.as_tensor(label)
        return bool(torch.isin(lab, torch.tensor(self.unpaired_ids, dtype=lab.dtype)).any()) if self.unpaired_ids else False

    def __call__(self, label: Any) -> Any:
        if self.unpaired == "error" and self.has_unpaired(label):
            raise ValueError("the label map contains lung lobes, which have no left/right partner: not flipping it")
        was_numpy = isinstance(label, np.ndarray)
        flipped = self.flip(torch.as_tensor(label) if was_numpy else label)
        ids = flipped.long().as_subclass(torch.Tensor)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.table)):
            bad = torch.unique(ids[(ids < 0) | (ids >= len(self.table))])[:5].tolist()
            raise InputError(source_name(label), f"label id(s) {bad} are outside 0..{len(self.table) - 1}", "remap the labels to the bundle's ids")
        swapped = self.table.to(ids.device)[ids].to(flipped.dtype)
        if was_numpy:
            return swapped.numpy().astype(label.dtype)
        flipped.data = swapped  # keep MetaTensor metadata and the applied Flip
        return flipped


class RandFlipSwapLRd(RandomizableTransform, MapTransform):
    """Random left-right flip of image and label keys together, swapping paired label ids.

    Args:
        keys: every key to flip (images and labels).
        label_keys: the subset of ``keys`` holding label maps (relabelled after the flip).
        prob: probability of flipping a sample.
        spatial_axis: the left-right axis (0 in RAS).
        lung_policy: ``"skip"`` (default: samples whose labels contain lung lobes are never flipped),
            ``"ignore"`` (flip; lobes become ``ignore_value``) or ``"error"``.

    Input: dict of channel-first arrays ``(C, H, W, D)``; output: the same keys, all flipped or none.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = ("label",),
        prob: float = 0.5,
        spatial_axis: int = 0,
        pairs: Sequence[tuple[int, int]] = UKBOB_LR_PAIRS,
        lung_policy: str = "skip",
        ignore_value: int = IGNORE_LABEL,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if lung_policy not in LUNG_POLICIES:
            raise ValueError(f"lung_policy must be one of {LUNG_POLICIES}, got {lung_policy!r}")
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.lung_policy = lung_policy
        unpaired = "ignore" if lung_policy == "ignore" else "error"
        self.label_flip = FlipSwapLR(spatial_axis, pairs, UKBOB_LUNG_LOBE_IDS, unpaired, ignore_value)
        self.image_flip = Flip(spatial_axis=spatial_axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        if self.lung_policy == "skip" and any(
            self.label_flip.has_unpaired(d[k]) for k in self.key_iterator(d) if k in self.label_keys
        ):
            return d
        for key in self.key_iterator(d):
            d[key] = self.label_flip(d[key]) if key in self.label_keys else self.image_flip(d[key])
        return d


# ---------------------------------------------------------------- BraTS 2023 labels <-> TC/WT/ET
# MONAI's ConvertToMultiChannelBasedOnBratsClasses expects the BraTS 2021 ET id 4; BraTS 2023 uses 3.
def _brats_paint_order() -> tuple[tuple[int, int], ...]:
    """(region channel, the one id it adds) from the largest region to the smallest.

    From ``custom.labels.BRATS_REGIONS``: WT adds ED (2), TC adds NCR (1), ET adds ET (3).
    """
    regions = [ids for _, ids in BRATS_REGIONS]
    order = []
    for channel in sorted(range(len(regions)), key=lambda c: -len(regions[c])):
        own = regions[channel] - set().union(*(r for r in regions if r < regions[channel]))
        if len(own) != 1:
            raise ValueError(f"BRATS_REGIONS are not nested one id at a time: {BRATS_REGIONS}")
        order.append((channel, next(iter(own))))
    return tuple(order)


BRATS_PAINT_ORDER = _brats_paint_order()
BRATS_IDS = frozenset(BRATS_LABELS)


class BratsLabelToRegions(Transform):
    """BraTS 2023 label map -> one binary channel per region of ``BRATS_REGIONS`` (TC, WT, ET).

    Input: ``(1, H, W, D)`` ids 0 background, 1 NCR, 2 ED, 3 ET (tensor, MetaTensor or NumPy).
    Output: ``(3, H, W, D)`` float32 masks TC = {1, 3}, WT = {1, 2, 3}, ET = {3}, same type and
    metadata. Any other id (e.g. 4, the BraTS 2021 ET id) raises :class:`custom.errors.InputError`.
    """

    def __call__(self, label: Any) -> Any:
        lab = convert_to_tensor(label, track_meta=False)
        if lab.ndim != 4 or lab.shape[0] != 1:
            raise ValueError(f"expected a channel-first label map (1, H, W, D), got shape {tuple(lab.shape)}")
        lab = lab.long()
        bad = sorted(set(torch.unique(lab).tolist()) - BRATS_IDS)
        if bad:
            fix = "BraTS 2021 files use 4 for ET: map 4 -> 3" if 4 in bad else "give a BraTS 2023 label map"
            raise InputError(source_name(label), f"label id(s) {bad} are not BraTS 2023 ids {sorted(BRATS_IDS)}", fix)
        masks = torch.cat([torch.isin(lab, torch.tensor(sorted(ids))) for _, ids in BRATS_REGIONS]).float()
        out, *_ = convert_to_dst_type(masks, label, dtype=torch.float32 if not isinstance(label, np.ndarray) else np.float32)
        return out


class BratsRegionsToLabel(Transform):
    """TC / WT / ET masks -> BraTS 2023 label map: WT \\ TC -> 2 (ED), TC \\ ET -> 1 (NCR), ET -> 3.

    Input: ``(3, H, W, D)`` binary masks in ``BRATS_REGIONS`` order (e.g. sigmoid outputs after
    ``AsDiscrete(threshold=0.5)``). Regions are painted largest first (WT, TC, ET), so a voxel in a
    smaller region gets its id even where a network's masks are not nested.
    Output: ``(1, H, W, D)`` ids 0..3, same type and metadata (dtype ``dtype``).
    """

    def __init__(self, dtype: Any = torch.uint8):
        self.dtype = dtype

    def __call__(self, regions: Any) -> Any:
        reg = convert_to_tensor(regions, track_meta=False)
        if reg.ndim != 4 or reg.shape[0] != len(BRATS_REGIONS):
            raise ValueError(f"expected {len(BRATS_REGIONS)} region channels (C, H, W, D), got shape {tuple(reg.shape)}")
        label = torch.zeros((1, *reg.shape[1:]), dtype=torch.uint8, device=reg.device)
        for channel, idx in BRATS_PAINT_ORDER:
            label[0][reg[channel] > 0.5] = idx
        out, *_ = convert_to_dst_type(label, regions, dtype=self.dtype)
        return out


class BratsLabelToRegionsd(ArrayTwind):
    """Dictionary version of :class:`BratsLabelToRegions`: ``keys`` hold ``(1, H, W, D)`` BraTS 2023 label maps."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = BratsLabelToRegions()


class BratsRegionsToLabeld(ArrayTwind):
    """Dictionary version of :class:`BratsRegionsToLabel`: ``keys`` hold ``(3, H, W, D)`` TC/WT/ET masks."""

    def __init__(self, keys: KeysCollection, dtype: Any = torch.uint8, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = BratsRegionsToLabel(dtype)


class LogitsToLabels(Transform):
    """A network's ``(C, *spatial)`` pre-activation scores -> labels, on the grid they are on.

    ``softmax``: ``(1, *spatial)`` argmax; ``sigmoid``: ``(C, *spatial)`` masks of scores above 0
    (probability above 0.5). Deciding before ``Invertd`` lets the inversion move one uint8 channel with
    nearest-neighbour interpolation instead of C float channels. An integer input is already a label
    map (``custom.inferers.StreamingSlidingWindowInferer`` decides slab by slab) and is returned as it
    is. Scores may be logits or log-probabilities (ETTA's output); probabilities do not work for sigmoid.
    Metadata is kept.
    """

    def __init__(self, activation: str = "softmax"):
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.activation = activation

    def __call__(self, scores: Any) -> Any:
        from custom.inferers import decide_labels

        tensor = convert_to_tensor(scores, track_meta=False)
        if not tensor.is_floating_point():
            return scores
        out, *_ = convert_to_dst_type(decide_labels(tensor[None], self.activation)[0], scores)
        return out


class LogitsToLabelsd(ArrayTwind):
    """Dictionary version of :class:`LogitsToLabels`."""

    def __init__(self, keys: KeysCollection, activation: str = "softmax", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = LogitsToLabels(activation)


# ---------------------------------------------------------------- MONAI Label's extra keys
class SafeSpacingd(Spacingd):
    """``monai.transforms.Spacingd`` that leaves a request's plain ``<key>_*`` entries alone.

    MONAI 1.6's ``Spacingd`` takes every ``<key>_*`` entry of the data dict for a metadata dict and
    calls ``.update`` on it when the image came from a NIfTI file; MONAI Label 0.8.5 puts the string
    ``image_path`` into every inference request (its writer reads it back), so the bundles crashed
    there. This subclass sets aside the ``<key>_*`` entries that are not mappings for its own call
    and puts them back unchanged; resampling, metadata and the inverse are ``Spacingd``'s.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        prefixes = tuple(f"{key}_" for key in self.keys)
        stray = {k: v for k, v in data.items()
                 if isinstance(k, str) and k.startswith(prefixes) and not isinstance(v, Mapping)}
        out = super().__call__({k: v for k, v in data.items() if k not in stray}, lazy=lazy)
        out.update(stray)
        return out


def labels_to_input_grid(
    labels: torch.Tensor, model_affine: Any, input_affine: Any, input_shape: Sequence[int]
) -> torch.Tensor | None:
    """Nearest-neighbour resampling of ``(C, *model_shape)`` labels onto the input's voxel grid, by indexing.

    Pre-processing that only reorients (``Orientationd``), rescales and shifts the axes (``Spacingd``)
    maps every input axis to one model axis, so nearest-neighbour resampling is a gather along each axis:
    no coordinate grid (MONAI's resampling builds one of 3 float64 numbers per output voxel, 1.9 GB for a
    512 x 512 x 300 CT), only the uint8 output. ``model_affine`` / ``input_affine``: 4 x 4 voxel-to-world
    matrices; ``input_shape``: the input's spatial shape. Voxels beyond the model grid take the nearest
    edge voxel (``Spacingd``'s ``border`` padding). Returns ``None`` when the grids are rotated against each
    other (then use ``Invertd``).
    """
    m = np.linalg.solve(np.asarray(model_affine, dtype=np.float64), np.asarray(input_affine, dtype=np.float64))
    linear = m[:3, :3]
    axes = np.abs(linear).argmax(axis=0)  # the model axis each input axis maps to
    off_axis = linear.copy()
    off_axis[axes, np.arange(3)] = 0.0
    if sorted(axes.tolist()) != [0, 1, 2] or np.abs(off_axis).max() > 1e-6 * np.abs(linear).max():
        return None
    out = labels.permute(0, *(1 + axes).tolist())  # dimension 1 + a now runs along input axis a
    for a in range(3):
        position = linear[axes[a], a] * np.arange(int(input_shape[a])) + m[axes[a], 3]
        index = np.clip(np.rint(position), 0, out.shape[1 + a] - 1).astype(np.int64)
        out = out.index_select(1 + a, torch.as_tensor(index, device=labels.device))
    return out


class InvertLabelsd(MapTransform):
    """``Invertd`` for label maps: back from the model grid to the input's grid, nearest neighbour.

    ``data[key]``: ``(C, *model_shape)`` labels (MetaTensor with the model grid's ``affine``);
    ``data[orig_key]``: the pre-processed image, whose metadata holds the input's ``original_affine``
    and ``spatial_shape``. Output: ``(C, *input_shape)`` with the input's affine and the label's other
    metadata, as ``Invertd(nearest_interp=True)`` gives, through :func:`labels_to_input_grid` when the
    pre-processing did not rotate the grid, and through MONAI's ``Invertd`` otherwise.
    """

    def __init__(self, keys: KeysCollection, transform: Any, orig_keys: str = "image", allow_missing_keys: bool = False):
        from monai.transforms import Invertd

        super().__init__(keys, allow_missing_keys)
        self.orig_key = orig_keys
        self.fallback = Invertd(keys, transform=transform, orig_keys=orig_keys, nearest_interp=True, to_tensor=True,
                                allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        image = d[self.orig_key]
        meta = getattr(image, "meta", {})
        if "original_affine" not in meta or "spatial_shape" not in meta:
            return self.fallback(d)
        input_affine, input_shape = np.asarray(meta["original_affine"]), [int(s) for s in np.asarray(meta["spatial_shape"])]
        for key in self.key_iterator(d):
            label = d[key]
            out = labels_to_input_grid(torch.as_tensor(label), np.asarray(label.affine), input_affine, input_shape)
            if out is None:
                return self.fallback(d)
            result = MetaTensor(out.as_tensor() if isinstance(out, MetaTensor) else out, meta=dict(label.meta))
            result.affine = torch.as_tensor(input_affine, dtype=torch.float64)
            result.meta["spatial_shape"] = np.asarray(input_shape)
            d[key] = result
        return d


# ---------------------------------------------------------------- safe loading, input checks, atomic output
@contextlib.contextmanager
def without_nvimgcodec_notice() -> Iterator[None]:
    """Hold back the two notices MONAI 1.6 gives each time a ``LoadImage`` is built on a machine without
    nvImageCodec (every CPU machine): it builds every registered reader, and its nvImageCodec DICOM reader
    says twice that it falls back to pydicom. That reader is never chosen there; other messages still show."""
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
            yield
    finally:
        logger.setLevel(level)


def load_image_checked(path: str | os.PathLike, reader: str | None = None) -> Any:
    """``monai.transforms.LoadImage`` (channel-first, with metadata) with one-line errors for bad files."""
    path = check_readable(path)
    with without_nvimgcodec_notice():
        load = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)
    try:
        return load(str(path))
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with without_nvimgcodec_notice():
            super().__init__(*args, **kwargs)

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


class CheckLabeld(MapTransform):
    """Validate loaded label maps: integer ids within ``0..num_classes-1`` (plus ``extra_ids``).

    Input: a dict with channel-first label maps under ``keys``; output: the same dict, unchanged.
    Raises :class:`InputError` naming the label file (:func:`custom.checks.check_label`); without it
    an id beyond the class count fails deep inside one-hot encoding with an index error.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, extra_ids: Sequence[int] = (), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes, self.extra_ids = num_classes, tuple(extra_ids)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_label(d[key], self.num_classes, self.extra_ids)
        return d


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


class AtomicNibabelWriter(NibabelWriter):
    """``monai.data.NibabelWriter`` that writes to a temporary file and renames it into place.

    Use it as ``SaveImaged(..., writer="custom.transforms.AtomicNibabelWriter")``: an interrupted or
    failed save leaves no truncated ``.nii.gz`` behind.
    """

    def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)
        if verbose:
            print(f"wrote {filename}", flush=True)
