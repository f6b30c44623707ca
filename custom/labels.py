"""Every label fact of the project, in one place (``SPEC.md`` section 5).

Taxonomies (id -> name), the TotalSegmentator -> UKBOB / BTCV maps, the left/right label pairs that
a flip must swap, the expected connected-component counts SOLF cleans to, and the input channel
names. Bundles' ``metadata.json`` ``channel_def`` entries are generated from here
(``python -m custom.labels sync``) and a test checks that they agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np

# ---------------------------------------------------------------- UKBOB / TotalVibeSegmentator
_UKBOB_NAMES = """
spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right
adrenal_gland_left lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right
lung_middle_lobe_right lung_lower_lobe_right esophagus trachea thyroid_gland intestine duodenum
unused urinary_bladder prostate sacrum heart aorta pulmonary_vein brachiocephalic_trunk
subclavian_artery_right subclavian_artery_left common_carotid_artery_right
common_carotid_artery_left brachiocephalic_vein_left brachiocephalic_vein_right
atrial_appendage_left superior_vena_cava inferior_vena_cava portal_vein_and_splenic_vein
iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right
scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right hip_left hip_right
spinal_cord gluteus_maximus_left gluteus_maximus_right gluteus_medius_left gluteus_medius_right
gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left
iliopsoas_right sternum costal_cartilages subcutaneous_fat muscle inner_fat IVD vertebra_body
vertebra_posterior_elements spinal_channel bone_other
""".split()

#: UKBOB ids 0..72 (id 20 is unused in TotalVibeSegmentator but keeps its slot so ids never shift).
UKBOB_LABELS: Mapping[int, str] = MappingProxyType({0: "background", **dict(enumerate(_UKBOB_NAMES, 1))})
UKBOB_NUM_CLASSES = len(UKBOB_LABELS)  # 73 output channels, background included
UKBOB_UNUSED_IDS = frozenset({20})
UKBOB_ID = MappingProxyType({name: i for i, name in UKBOB_LABELS.items()})

#: Dixon input channels of the whole-body MRI, in the order the network sees them.
DIXON_CHANNELS = ("fat", "water", "in_phase", "opposed_phase")

#: Left/right organ pairs (left id, right id): a left-right flip must swap them.
UKBOB_LR_PAIRS: tuple[tuple[int, int], ...] = (
    (3, 2), (9, 8), (29, 28), (31, 30), (32, 33), (38, 39), (40, 41), (42, 43), (44, 45), (46, 47),
    (48, 49), (50, 51), (53, 54), (55, 56), (57, 58), (59, 60), (61, 62),
)
#: Lung lobes: 2 left, 3 right, so no one-to-one swap exists; a volume with lobes must not be L/R flipped.
UKBOB_LUNG_LOBE_IDS = frozenset({10, 11, 12, 13, 14})

#: SOLF's ignore value: voxels of a rejected organ, masked out of the training loss.
IGNORE_LABEL = 255

# ---------------------------------------------------------------- connected components


@dataclass(frozen=True)
class ComponentRange:
    """Expected number of connected components of one organ (TotalVibeSegmentator's own min/max).

    ``reduce`` says whether SOLF may cut the organ down to its ``max_count`` largest components;
    vessels and diffuse tissues are never reduced (their extra components are real anatomy).
    """

    min_count: int = 1
    max_count: int = 1
    reduce: bool = True


_VESSEL_IDS = frozenset({25, 26, 27, 28, 29, 30, 31, 32, 33, 35, 36, 37, 38, 39, 40, 41})
_SPECIAL_RANGES = {
    17: ComponentRange(1, 2),  # thyroid: two lobes
    26: ComponentRange(1, 2, reduce=False),  # pulmonary veins: two sides
    64: ComponentRange(4, 30),  # costal cartilages
    65: ComponentRange(1, 1000),  # subcutaneous fat
    66: ComponentRange(1, 1000),  # muscle
    67: ComponentRange(1, 1000),  # inner fat
    68: ComponentRange(1, 25),  # intervertebral discs
    69: ComponentRange(1, 25),  # vertebral bodies
    70: ComponentRange(1, 25),  # posterior elements
    72: ComponentRange(0, 10),  # other bone
}


def expected_components(organ_id: int) -> ComponentRange:
    """Expected connected-component range of a UKBOB organ id (1 for solid organs, intestine too)."""
    if organ_id in _SPECIAL_RANGES:
        return _SPECIAL_RANGES[organ_id]
    if organ_id in _VESSEL_IDS:
        return ComponentRange(1, 1, reduce=False)
    return ComponentRange()


UKBOB_COMPONENT_RANGES: Mapping[int, ComponentRange] = MappingProxyType(
    {i: expected_components(i) for i in UKBOB_LABELS if i != 0 and i not in UKBOB_UNUSED_IDS}
)

# ---------------------------------------------------------------- BTCV
BTCV_LABELS: Mapping[int, str] = MappingProxyType(
    dict(
        enumerate(
            (
                "background", "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus",
                "liver", "stomach", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein",
                "pancreas", "adrenal_gland_right", "adrenal_gland_left",
            )
        )
    )
)
BTCV_NUM_CLASSES = len(BTCV_LABELS)  # 14
#: UKBOB id -> BTCV id (SPEC section 5); every other UKBOB id is background in BTCV.
UKBOB_TO_BTCV: Mapping[int, int] = MappingProxyType(
    {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 25: 8, 36: 9, 37: 10, 7: 11, 8: 12, 9: 13}
)
#: BTCV left/right pairs (left id, right id).
BTCV_LR_PAIRS: tuple[tuple[int, int], ...] = ((3, 2), (13, 12))
BTCV_CT_WINDOW = (-175.0, 250.0)  # HU, scaled to [0, 1] and clipped

# ---------------------------------------------------------------- BraTS 2023
BRATS_CONTRASTS = ("t1", "t1c", "t2", "flair")
#: BraTS 2023 label ids (2021 used 4 for enhancing tumour; 2023 uses 3).
BRATS_LABELS: Mapping[int, str] = MappingProxyType({0: "background", 1: "NCR", 2: "ED", 3: "ET"})
#: Output channel -> (region name, BraTS 2023 ids it contains). Nested regions, sigmoid outputs.
BRATS_REGIONS: tuple[tuple[str, frozenset[int]], ...] = (
    ("TC", frozenset({1, 3})),
    ("WT", frozenset({1, 2, 3})),
    ("ET", frozenset({3})),
)

# ---------------------------------------------------------------- TotalSegmentator -> UKBOB
#: TotalSegmentator v2 ``total`` id -> UKBOB id. Vertebrae, ribs, skull, brain and kidney cysts have
#: no UKBOB id and map to background (0): this project does not lump them into 72 bone_other.
TOTALSEG_TOTAL_TO_UKBOB: Mapping[int, int] = MappingProxyType(
    {
        **{i: i for i in (*range(1, 18), 19, 21, 22)},
        18: 18,  # small_bowel -> intestine
        20: 18,  # colon -> intestine
        25: 23,  # sacrum
        **{i: i - 27 for i in range(51, 90)},  # heart (51) ... iliopsoas_right (89) -> 24 ... 62
        116: 63,  # sternum
        117: 64,  # costal_cartilages
    }
)

#: TotalSegmentator ``total_mr`` id -> name (TotalSegmentator 2.x ``map_to_binary.class_map``).
TOTALSEG_MR_LABELS: Mapping[int, str] = MappingProxyType(
    dict(
        enumerate(
            """spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right
            adrenal_gland_left lung_left lung_right esophagus small_bowel duodenum colon
            urinary_bladder prostate sacrum vertebrae intervertebral_discs spinal_cord heart aorta
            inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right
            iliac_vena_left iliac_vena_right humerus_left humerus_right scapula_left scapula_right
            clavicula_left clavicula_right femur_left femur_right hip_left hip_right
            gluteus_maximus_left gluteus_maximus_right gluteus_medius_left gluteus_medius_right
            gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right
            iliopsoas_left iliopsoas_right brain""".split(),
            1,
        )
    )
)
# Names that differ between total_mr and UKBOB; whole lungs (no lobes), whole vertebrae (no body /
# posterior split) and brain have no UKBOB id and map to background.
_MR_NAME_ALIASES = {"small_bowel": "intestine", "colon": "intestine", "intervertebral_discs": "IVD"}
TOTALSEG_MR_TO_UKBOB: Mapping[int, int] = MappingProxyType(
    {
        i: UKBOB_ID[_MR_NAME_ALIASES.get(name, name)]
        for i, name in TOTALSEG_MR_LABELS.items()
        if _MR_NAME_ALIASES.get(name, name) in UKBOB_ID
    }
)


def compose(first: Mapping[int, int], second: Mapping[int, int]) -> dict[int, int]:
    """The map ``second(first(i))``, keeping only ids that survive both (0 dropped)."""
    return {i: second[j] for i, j in first.items() if j in second and second[j] != 0}


TOTALSEG_TOTAL_TO_BTCV: Mapping[int, int] = MappingProxyType(compose(TOTALSEG_TOTAL_TO_UKBOB, UKBOB_TO_BTCV))
TOTALSEG_MR_TO_BTCV: Mapping[int, int] = MappingProxyType(compose(TOTALSEG_MR_TO_UKBOB, UKBOB_TO_BTCV))


def remap_labels(labels: np.ndarray, mapping: Mapping[int, int], max_id: int | None = None) -> np.ndarray:
    """Relabel an integer label map by ``mapping``; ids not in it become 0 (background).

    Args:
        labels: integer array of any shape (negative ids are not allowed).
        mapping: source id -> target id.
        max_id: the largest id that may appear in ``labels``; defaults to ``labels.max()``.

    Returns:
        a ``uint8`` array of the same shape with target ids.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.uint8)
    top = int(labels.max()) if max_id is None else max_id
    table = np.zeros(max(top, max(mapping, default=0)) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table[labels.astype(np.int64)]


# ---------------------------------------------------------------- label maps SOLF and QC measure
#: taxonomy of a label map -> {its id: UKBOB id}. SOLF and per-scan QC measure every map in UKBOB ids
#: (organ names, component ranges); ids without a UKBOB organ become background.
TO_UKBOB: Mapping[str, Mapping[int, int]] = MappingProxyType(
    {
        "ukbob": MappingProxyType({i: i for i in UKBOB_LABELS if i != 0 and i not in UKBOB_UNUSED_IDS}),
        "btcv": MappingProxyType({b: u for u, b in UKBOB_TO_BTCV.items()}),
        "totalsegmentator": TOTALSEG_TOTAL_TO_UKBOB,
        "totalsegmentator_mr": TOTALSEG_MR_TO_UKBOB,
    }
)
#: the largest id a label map of each taxonomy may hold (TotalSegmentator v2 ``total``: 117 costal_cartilages)
MAX_LABEL_ID: Mapping[str, int] = MappingProxyType(
    {"ukbob": max(UKBOB_LABELS), "btcv": max(BTCV_LABELS), "totalsegmentator": 117, "totalsegmentator_mr": max(TOTALSEG_MR_LABELS)}
)


def to_ukbob(labels: np.ndarray, taxonomy: str) -> np.ndarray:
    """A label map of ``taxonomy`` (a key of :data:`TO_UKBOB`) in UKBOB ids, ``uint8``, same shape.

    A UKBOB map comes back as it is (as ``uint8``); ids above :data:`MAX_LABEL_ID` must be checked by
    the caller (they raise ``IndexError`` here).
    """
    labels = np.asarray(labels)
    if taxonomy == "ukbob":
        return labels if labels.dtype == np.uint8 else labels.astype(np.uint8)
    return remap_labels(labels, TO_UKBOB[taxonomy], MAX_LABEL_ID[taxonomy])


# ---------------------------------------------------------------- bundle metadata
@dataclass(frozen=True)
class Taxonomy:
    """What a bundle's network takes in and puts out, as ``metadata.json`` ``channel_def`` dicts."""

    input_channels: tuple[str, ...]
    output_channels: Mapping[int, str]
    output_type: str  # "softmax" (one class per voxel) or "sigmoid" (overlapping regions)


TAXONOMIES: Mapping[str, Taxonomy] = MappingProxyType(
    {
        "ukbob": Taxonomy(DIXON_CHANNELS, UKBOB_LABELS, "softmax"),
        "btcv": Taxonomy(("ct",), BTCV_LABELS, "softmax"),
        "brats": Taxonomy(BRATS_CONTRASTS, {i: name for i, (name, _) in enumerate(BRATS_REGIONS)}, "sigmoid"),
    }
)
#: bundle folder name -> taxonomy key
BUNDLE_TAXONOMY = MappingProxyType({"swin_bob_ukbob": "ukbob", "swin_bob_btcv": "btcv", "swin_bob_brats": "brats"})


def channel_defs(taxonomy: str) -> tuple[dict[str, str], dict[str, str]]:
    """(input ``channel_def``, output ``channel_def``) of a taxonomy, keys as strings (JSON)."""
    tax = TAXONOMIES[taxonomy]
    return (
        {str(i): name for i, name in enumerate(tax.input_channels)},
        {str(i): name for i, name in tax.output_channels.items()},
    )


def sync_metadata(bundles_dir: str | Path = Path(__file__).resolve().parents[1] / "bundles", check: bool = False) -> list[str]:
    """Write (or with ``check=True`` only compare) the ``channel_def`` of each bundle's metadata.json.

    Returns the list of metadata files that differ from this module (empty when all agree).
    """
    differ = []
    for bundle, taxonomy in BUNDLE_TAXONOMY.items():
        meta_file = Path(bundles_dir) / bundle / "configs" / "metadata.json"
        if not meta_file.exists():
            continue
        meta = json.loads(meta_file.read_text())
        in_def, out_def = channel_defs(taxonomy)
        net = meta["network_data_format"]
        first_in, first_out = next(iter(net["inputs"].values())), next(iter(net["outputs"].values()))
        if first_in.get("channel_def") != in_def or first_out.get("channel_def") != out_def:
            differ.append(str(meta_file))
            if not check:
                first_in["channel_def"], first_out["channel_def"] = in_def, out_def
                from custom.io import atomic_write_text

                atomic_write_text(meta_file, json.dumps(meta, indent=4) + "\n")
    return differ


if __name__ == "__main__":
    import fire

    fire.Fire({"sync": sync_metadata})
