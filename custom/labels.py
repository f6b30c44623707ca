"""Every label fact of the project, in one place (``docs/labels.md``).

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

from custom.atomic import atomic_write_text

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
                atomic_write_text(meta_file, json.dumps(meta, indent=4) + "\n")
    return differ


# ---------------------------------------------------------------- DICOM-SEG coded concepts
# Source: TotalSegmentator 2.18.0 (Apache-2.0), totalsegmentator/resources/totalsegmentator_snomed_mapping.csv
# in the sdist that custom.sample_data fetches: SNOMED CT (scheme SCT) segmented property category
# and type, laterality modifier, anatomic region and display colour per structure. Three UKBOB names
# take the row of TotalSegmentator's equivalent class: muscle <- skeletal_muscle, inner_fat <-
# torso_fat (fat of the trunk that is not subcutaneous), vertebra_body <- vertebrae_body. One typo of
# the source is corrected ("Gluteus minius muscle" -> "Gluteus minimus muscle").
# Columns: name, category code, type code, modifier (L = 7771000 Left, R = 24028007 Right, - none),
# anatomic region code (-: none), RGB, type meaning.
_SNOMED_TABLE = """
spleen                        123037004 78961009  - -        50,170,60   Spleen
kidney_right                  123037004 64033007  R -        34,102,136  Kidney
kidney_left                   123037004 64033007  L -        46,138,184  Kidney
gallbladder                   123037004 28231008  - -        54,216,119  Gallbladder
liver                         123037004 10200004  - -        40,140,40   Liver
stomach                       123037004 69695003  - -        180,70,160  Stomach
pancreas                      123037004 15776009  - -        60,150,80   Pancreas
adrenal_gland_right           123037004 23451007  R -        178,128,26  Adrenal gland
adrenal_gland_left            123037004 23451007  L -        241,172,34  Adrenal gland
lung_upper_lobe_left          123037004 45653009  L -        71,232,244  Upper lobe of lung
lung_lower_lobe_left          123037004 90572001  L -        34,195,207  Lower lobe of lung
lung_upper_lobe_right         123037004 45653009  R -        100,218,227 Upper lobe of lung
lung_middle_lobe_right        123037004 72481006  - -        63,181,190  Middle lobe of right lung
lung_lower_lobe_right         123037004 90572001  R -        26,144,153  Lower lobe of lung
esophagus                     123037004 32849002  - -        190,90,170  Esophagus
trachea                       123037004 44567001  - -        0,180,200   Trachea
thyroid_gland                 123037004 69748006  - -        250,210,60  Thyroid gland
duodenum                      123037004 38848004  - -        170,80,190  Duodenum
urinary_bladder               123037004 89837001  - -        54,94,216   Urinary bladder
prostate                      123037004 41216001  - -        91,253,156  Prostate
sacrum                        123037004 54735007  - -        100,216,54  Sacrum
heart                         123037004 80891009  - -        180,0,40    Heart
aorta                         123037004 15825003  - -        216,108,54  Aorta
pulmonary_vein                123037004 122972007 - -        37,107,237  Pulmonary vein
brachiocephalic_trunk         123037004 12691009  - -        190,10,10   Brachiocephalic artery
subclavian_artery_right       123037004 29700009  R -        162,26,26   Subclavian artery
subclavian_artery_left        123037004 29700009  L -        218,34,34   Subclavian artery
common_carotid_artery_right   123037004 32062004  R -        170,17,17   Common carotid artery
common_carotid_artery_left    123037004 32062004  L -        230,23,23   Common carotid artery
brachiocephalic_vein_left     123037004 8887007   L -        0,92,241    Brachiocephalic vein
brachiocephalic_vein_right    123037004 8887007   R -        0,68,178    Brachiocephalic vein
atrial_appendage_left         123037004 68786006  L -        68,248,62   Auricular appendage
superior_vena_cava            123037004 48345005  - -        74,144,18   Superior vena cava
inferior_vena_cava            123037004 64131007  - -        0,70,200    Inferior vena cava
portal_vein_and_splenic_vein  123037004 110765007 - -        0,90,220    Portal vein and splenic vein
iliac_artery_left             123037004 73634005  L -        218,0,0     Common iliac artery
iliac_artery_right            123037004 73634005  R -        162,0,0     Common iliac artery
iliac_vena_left               123037004 46027005  L -        0,92,230    Common iliac vein
iliac_vena_right              123037004 46027005  R -        0,68,170    Common iliac vein
humerus_left                  123037004 85050009  L -        71,62,248   Humerus
humerus_right                 123037004 85050009  R -        115,46,184  Humerus
scapula_left                  123037004 79601000  L -        253,230,195 Scapula
scapula_right                 123037004 79601000  R -        187,170,144 Scapula
clavicula_left                123037004 51299004  L -        255,236,201 Clavicle
clavicula_right               123037004 51299004  R -        191,174,149 Clavicle
femur_left                    123037004 71341001  L -        248,212,62  Femur
femur_right                   123037004 71341001  R -        46,184,60   Femur
hip_left                      123037004 29836001  L -        230,248,62  Hip
hip_right                     123037004 29836001  R -        184,46,184  Hip
spinal_cord                   123037004 2748008   - -        255,215,0   Spinal cord
gluteus_maximus_left          123037004 181674001 L -        253,115,34  Gluteus maximus muscle
gluteus_maximus_right         123037004 181674001 R -        187,85,26   Gluteus maximus muscle
gluteus_medius_left           123037004 78333006  L -        255,126,46  Gluteus medius muscle
gluteus_medius_right          123037004 78333006  R -        196,94,34   Gluteus medius muscle
gluteus_minimus_left          123037004 75297007  L -        255,138,57  Gluteus minimus muscle
gluteus_minimus_right         123037004 75297007  R -        204,102,42  Gluteus minimus muscle
autochthon_left               123037004 244849004 L -        241,126,57  Deep muscle of back
autochthon_right              123037004 244849004 R -        178,94,42   Deep muscle of back
iliopsoas_left                123037004 68455001  L -        230,115,46  Iliopsoas muscle
iliopsoas_right               123037004 68455001  R -        170,85,34   Iliopsoas muscle
sternum                       123037004 56873002  - -        215,195,165 Sternum
costal_cartilages             123037004 50016007  - -        250,220,190 Costal cartilage
subcutaneous_fat              85756007  67769002  - -        255,242,178 Subcutaneous fatty tissue
muscle                        123037004 127954009 - -        230,130,40  Skeletal muscle
inner_fat                     85756007  55603005  - 22943007 250,235,160 Fat
vertebra_body                 123037004 3572006   - -        190,160,130 Vertebral body
"""
#: UKBOB name -> the TotalSegmentator class whose row the table takes (the names differ).
SEGMENT_CODE_ALIASES: Mapping[str, str] = MappingProxyType(
    {"muscle": "skeletal_muscle", "inner_fat": "torso_fat", "vertebra_body": "vertebrae_body"}
)
#: SNOMED CT category codes that the table uses -> meaning.
_SCT_CATEGORIES = {"123037004": "Anatomical Structure", "85756007": "Tissue", "49755003": "Morphologically Altered Structure"}
_SCT_MODIFIERS = {"L": ("7771000", "Left"), "R": ("24028007", "Right")}
_SCT_REGIONS = {"22943007": "Trunk"}
#: Private coding scheme (DICOM PS3.16 8.2: designators beginning with "99") for structures without a
#: SNOMED CT row in the source; values are stable, never reused.
PROJECT_CODING_SCHEME = "99SWINBOB"
#: name -> (category code, project code value, meaning, RGB); BraTS sub-regions are morphologically
#: altered structures, the rest anatomical structures or tissue.
_PROJECT_CODES = {
    "intestine": ("123037004", "SB001", "Intestine (small bowel and colon)", (160, 60, 180)),
    "IVD": ("123037004", "SB002", "Intervertebral disc", (200, 190, 120)),
    "vertebra_posterior_elements": ("123037004", "SB003", "Posterior elements of vertebra", (170, 140, 110)),
    "spinal_channel": ("123037004", "SB004", "Spinal canal", (240, 200, 40)),
    "bone_other": ("123037004", "SB005", "Other bone", (225, 210, 180)),
    "NCR": ("49755003", "SB101", "Necrotic tumour core", (255, 0, 0)),
    "ED": ("49755003", "SB102", "Peritumoural oedema", (0, 200, 0)),
    "ET": ("49755003", "SB103", "Enhancing tumour", (255, 220, 0)),
}


@dataclass(frozen=True)
class SegmentCode:
    """Coded concept and colour of one structure for a DICOM-SEG segment.

    Codes are ``(coding scheme designator, code value, code meaning)`` triples; ``modifier`` is the
    laterality and ``region`` the anatomic region (``None`` when the concept needs none).
    """

    category: tuple[str, str, str]
    type: tuple[str, str, str]
    modifier: tuple[str, str, str] | None
    region: tuple[str, str, str] | None
    rgb: tuple[int, int, int]


def _segment_codes() -> dict[str, SegmentCode]:
    codes = {}
    for line in _SNOMED_TABLE.strip().splitlines():
        name, category, value, modifier, region, rgb, meaning = line.split(maxsplit=6)
        codes[name] = SegmentCode(
            ("SCT", category, _SCT_CATEGORIES[category]),
            ("SCT", value, meaning),
            ("SCT", *_SCT_MODIFIERS[modifier]) if modifier != "-" else None,
            ("SCT", region, _SCT_REGIONS[region]) if region != "-" else None,
            tuple(int(v) for v in rgb.split(",")),
        )
    for name, (category, value, meaning, rgb) in _PROJECT_CODES.items():
        codes[name] = SegmentCode(("SCT", category, _SCT_CATEGORIES[category]),
                                  (PROJECT_CODING_SCHEME, value, meaning), None, None, rgb)
    return codes


#: structure name (UKBOB, BTCV and BraTS label names) -> :class:`SegmentCode`.
SEGMENT_CODES: Mapping[str, SegmentCode] = MappingProxyType(_segment_codes())


if __name__ == "__main__":
    import fire

    fire.Fire({"sync": sync_metadata})
