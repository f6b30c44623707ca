"""Fuzzing SOLF stage A and the label transforms with random label maps (hypothesis).

Random shapes, ids (taxonomy ids, the ignore value and ids outside every taxonomy), anisotropic and
flipped voxel grids, empty maps and single-voxel organs. The contract under test: each function
either returns finite, consistent numbers or raises the documented one-line
:class:`custom.errors.InputError`; nothing else escapes.
"""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from monai.data import MetaTensor

from custom.errors import InputError
from custom.labels import (
    BRATS_LABELS,
    IGNORE_LABEL,
    UKBOB_COMPONENT_RANGES,
    UKBOB_LABELS,
    UKBOB_LR_PAIRS,
    UKBOB_LUNG_LOBE_IDS,
    UKBOB_UNUSED_IDS,
)
from custom.solf.batch import Item, StageAConfig, stage_a_volume
from custom.solf.features import clean_components, volume_features
from custom.solf.transforms import OrganComponentFilter, SOLFFeatures
from custom.transforms import BratsLabelToRegions, BratsRegionsToLabel, FlipSwapLR, RandFlipSwapLRd

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
ORGAN_IDS = sorted(i for i in UKBOB_LABELS if i and i not in UKBOB_UNUSED_IDS)
OUTSIDE_IDS = [-1, 73, 300, 70_000]  # negative, one past the taxonomy, > uint8, huge


@st.composite
def label_maps(draw, outside: bool = True, max_side: int = 10) -> np.ndarray:
    """An int32 ``(H, W, D)`` map: scattered voxels of 0-3 ids plus 0-3 solid boxes (organs)."""
    shape = draw(st.tuples(*[st.integers(1, max_side)] * 3))
    odd = [IGNORE_LABEL] + (OUTSIDE_IDS if outside else [])
    pool = st.one_of(*[st.sampled_from(ORGAN_IDS)] * 3, st.sampled_from(odd))  # 1 id in 4 is odd
    ids = draw(st.lists(pool, min_size=0, max_size=3))
    noise = draw(arrays(np.int32, shape, elements=st.sampled_from([0] * 6 + ids)))  # mostly background
    for organ in draw(st.lists(pool, max_size=3)):
        lo = [draw(st.integers(0, s - 1)) for s in shape]
        hi = [draw(st.integers(a + 1, s)) for a, s in zip(lo, shape)]
        noise[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = organ
    return noise


@st.composite
def affines(draw) -> np.ndarray:
    """Anisotropic voxel grids (0.3-8 mm per axis), axes permuted and flipped, with an offset."""
    spacing = draw(st.tuples(*[st.floats(0.3, 8.0, allow_nan=False)] * 3))
    perm = draw(st.permutations([0, 1, 2]))
    signs = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    aff = np.eye(4)
    aff[:3, :3] = np.eye(3)[list(perm)] * np.asarray(signs) * np.asarray(spacing)
    aff[:3, 3] = draw(st.tuples(*[st.floats(-500, 500)] * 3))
    return aff


def _outside(labels: np.ndarray, known) -> set[int]:
    return set(np.unique(labels).tolist()) - set(known)


def _assert_one_line(err: InputError) -> None:
    assert "\n" not in str(err) and "outside" in str(err) and err.fix


@FUZZ
@given(labels=label_maps(), affine=affines(), clean=st.booleans())
def test_volume_features_are_finite_or_a_clear_error(labels, affine, clean):
    bad = _outside(labels, UKBOB_LABELS)
    try:
        cleaned, rows = volume_features(labels, affine, clean=clean)
    except InputError as err:
        event("InputError")
        assert bad, f"InputError on valid ids: {err}"
        _assert_one_line(err)
        return
    assert not bad, f"ids {bad} outside the taxonomy were accepted"
    event(f"{len(rows)} organ(s)")
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    body_ml = np.count_nonzero(cleaned) * voxel_ml
    assert [r.organ_id for r in rows] == sorted(set(np.unique(cleaned).tolist()) - {0})
    for r in rows:
        values = [r.volume_ml, r.norm_volume, r.surface_mm2, r.sphericity, r.eccentricity, r.centroid_x, r.centroid_y, r.centroid_z]
        assert np.all(np.isfinite(values)), r
        assert r.voxels == np.count_nonzero(cleaned == r.organ_id) >= 1
        assert r.volume_ml == pytest.approx(r.voxels * voxel_ml, rel=1e-9)
        assert 0 < r.norm_volume <= 1 + 1e-9 and r.norm_volume == pytest.approx(r.volume_ml / body_ml)
        assert r.surface_mm2 > 0 and r.sphericity > 0 and 0 <= r.eccentricity <= 1  # one voxel: sphericity 2.79
        assert 1 <= r.components_after <= r.components_before
    # cleaning only ever turns voxels into background, and cleaning again changes nothing
    changed = cleaned != labels
    assert np.all(cleaned[changed] == 0)
    if clean:
        again, _ = clean_components(cleaned, UKBOB_COMPONENT_RANGES)
        np.testing.assert_array_equal(again, cleaned)
    else:
        assert not changed.any()


@FUZZ
@given(labels=label_maps(max_side=8), affine=affines())
def test_monai_transforms_keep_metadata_or_name_the_file(labels, affine):
    label = MetaTensor(torch.as_tensor(labels[None]), affine=torch.as_tensor(affine), meta={"filename_or_obj": "/d/case_7.nii.gz"})
    bad = _outside(labels, {0, IGNORE_LABEL, *UKBOB_COMPONENT_RANGES})
    try:
        out = OrganComponentFilter()(label)
    except InputError as err:
        assert bad and err.path == "/d/case_7.nii.gz"
        _assert_one_line(err)
    else:
        assert not bad
        assert isinstance(out, MetaTensor) and out.shape == label.shape and torch.equal(out.affine, label.affine)
        kept = out != label
        assert bool((out[kept] == 0).all())
    try:
        rows = SOLFFeatures()(label)
    except InputError as err:
        assert _outside(labels, UKBOB_LABELS) and err.path == "/d/case_7.nii.gz"
    else:
        assert all(np.isfinite([r.norm_volume, r.sphericity, r.eccentricity]).all() for r in rows)
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
        assert all(r.volume_ml == pytest.approx(r.voxels * voxel_ml) for r in rows)


@FUZZ
@given(labels=label_maps(max_side=8))
def test_flip_swap_is_an_involution_that_swaps_counts(labels):
    label = torch.as_tensor(labels[None])
    flip = FlipSwapLR(unpaired="ignore")
    try:
        once = flip(label)
    except InputError as err:
        assert _outside(labels, range(256))
        _assert_one_line(err)
        return
    assert not _outside(labels, range(256))
    lobes = np.isin(labels, list(UKBOB_LUNG_LOBE_IDS))
    if not lobes.any():
        assert torch.equal(flip(once), label)
    for left, right in UKBOB_LR_PAIRS[:8]:
        assert int((once == left).sum()) == int((label == right).sum())
    assert int((once == IGNORE_LABEL).sum()) == int((label == IGNORE_LABEL).sum()) + int(lobes.sum())


@FUZZ
@given(labels=label_maps(max_side=8, outside=False))
def test_rand_flip_swap_dict_flips_image_and_label_together_or_not_at_all(labels):
    image = torch.arange(labels.size, dtype=torch.float32).reshape(1, *labels.shape)
    data = {"image": image, "label": torch.as_tensor(labels[None])}
    out = RandFlipSwapLRd(["image", "label"], prob=1.0)(data)
    if np.isin(labels, list(UKBOB_LUNG_LOBE_IDS)).any():  # default policy "skip": never flip lung lobes
        assert torch.equal(out["image"], image) and torch.equal(out["label"], data["label"])
    else:
        assert torch.equal(out["image"], torch.flip(image, dims=[1]))
        assert torch.equal(out["label"], FlipSwapLR()(data["label"]))


@FUZZ
@given(labels=arrays(np.int16, st.tuples(*[st.integers(1, 6)] * 3), elements=st.integers(-1, 5)))
def test_brats_regions_round_trip_or_clear_error(labels):
    bad = _outside(labels, BRATS_LABELS)
    try:
        regions = BratsLabelToRegions()(labels[None])
    except InputError as err:
        assert bad and "\n" not in str(err)
        return
    assert not bad and regions.shape == (3, *labels.shape)
    np.testing.assert_array_equal(BratsRegionsToLabel(dtype=np.int16)(regions)[0], labels)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(
    labels=label_maps(max_side=6),
    dtype=st.sampled_from(["uint8", "int16", "int32", "float32"]),
    spoil=st.sampled_from(["none", "fraction", "nan", "zero_spacing"]),
)
def test_stage_a_worker_on_random_files_returns_rows_or_one_error_line(tmp_path_factory, labels, dtype, spoil):
    """The batch worker end to end (a real NIfTI file): finite rows, or an error record, never an exception."""
    folder = tmp_path_factory.mktemp("fuzz")
    data = labels.astype(np.float64)
    if spoil == "fraction":
        data = data + 0.5
    elif spoil == "nan":
        data.flat[0] = np.nan
    if dtype != "float32" and spoil in ("fraction", "nan"):
        spoil = "none"
        data = labels.astype(np.float64)
    if dtype == "uint8":
        data = np.clip(data, 0, 255)  # what the file can hold
    img = nib.Nifti1Image(data.astype(dtype), None)
    img.header.set_sform(np.diag([1.5, 0.8, 0.0 if spoil == "zero_spacing" else 4.0, 1.0]), code=2)
    nib.save(img, folder / "lab.nii.gz")
    item = Item(volume="lab.nii.gz", label=str(folder / "lab.nii.gz"))
    res = stage_a_volume(item, str(folder), StageAConfig())
    stored = np.asanyarray(nib.load(folder / "lab.nii.gz").dataobj)
    invalid = spoil in ("fraction", "nan", "zero_spacing") or bool(
        _outside(stored.astype(np.int64) if stored.dtype.kind != "f" else stored, set(ORGAN_IDS) | {0})
    )
    event("error record" if "error" in res else "rows")
    if "error" in res:
        assert invalid and "\n" not in res["error"] and res["error"].startswith(str(folder / "lab.nii.gz"))
        assert not (folder / "stage_a").exists()  # nothing written for a bad file: a fixed file is retried
        return
    assert not invalid, res
    for row in res["rows"]:
        assert np.all(np.isfinite([row["volume_ml"], row["norm_volume"], row["sphericity"], row["eccentricity"]])), row
