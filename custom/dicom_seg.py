"""DICOM-SEG output: a label map on a DICOM series' grid -> one Segmentation instance (highdicom).

``write_dicom_seg(label, affine, series_dir, output, names)`` writes one segment per structure
present in ``label``, each with its coded concept and colour from ``custom.labels.SEGMENT_CODES``
(SNOMED CT where TotalSegmentator's table has one, the project's ``99SWINBOB`` codes otherwise),
on the series' own frames: the Segmentation references every source SOP instance, shares the series'
study, patient and frame of reference, and each frame lies on one source image's plane.
:class:`SaveDicomSeg` / :class:`SaveDicomSegd` are the MONAI post-processing twins (a bundle picks
them with ``output_type``), :func:`nifti_to_dicom_seg` converts a written NIfTI label map
(``python -m custom.segment --output_type dicom_seg``).

The label map must be on the series' grid (the bundles' ``Invertd`` puts it there): every source
pixel centre must fall on a label voxel centre (within 0.01 voxel), else :class:`InputError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from custom.atomic import atomic_path
from custom.checks import check_readable, source_name
from custom.errors import InputError
from custom.labels import SEGMENT_CODES

#: the world axes of NIfTI/MONAI affines (RAS) against DICOM's patient coordinates (LPS)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_GRID_TOL = 0.01  # voxels


def read_series(series_dir: str | os.PathLike) -> list[Any]:
    """The headers (no pixel data) of the one image series in ``series_dir``, ordered along its normal.

    Raises :class:`InputError` when the folder holds no DICOM files, more than one series, or images
    without the UIDs a DICOM-SEG must reference.
    """
    import pydicom

    folder = check_readable(Path(series_dir))
    if not folder.is_dir():
        raise InputError(folder, "DICOM-SEG output needs a DICOM series folder as input",
                         "give the folder of the series, or ask for NIfTI output")
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
        except pydicom.errors.InvalidDicomError:
            continue  # DICOMDIR-free folders may hold notes, thumbnails, ...
    datasets = [ds for ds in datasets if "ImagePositionPatient" in ds and "Rows" in ds]
    if not datasets:
        raise InputError(folder, "holds no DICOM images", "give the folder of one DICOM image series")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1:
        raise InputError(folder, f"holds {len(series)} series", "give a folder with one series")
    for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not all(str(ds.get(key, "")) for ds in datasets):
            raise InputError(folder, f"images without {key}: a DICOM-SEG cannot reference them",
                             "use a series with its UIDs (e.g. as a PACS exports it)")
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def label_to_frames(label: np.ndarray, affine: np.ndarray, datasets: Sequence[Any]) -> np.ndarray:
    """Sample a label map onto the source images' pixels.

    Args:
        label: integer array ``(X, Y, Z)`` (a leading channel of size 1 is dropped).
        affine: its 4x4 voxel -> world (RAS, mm) affine, as NIfTI and MONAI store it.
        datasets: the source image headers (``read_series``), one frame each.

    Returns:
        ``(len(datasets), Rows, Columns)`` array of the label ids, frame ``k`` on ``datasets[k]``.
    Raises :class:`InputError` when a source pixel is not on a label voxel centre.
    """
    label = np.asarray(label)
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    if label.ndim != 3:
        raise InputError(None, f"the label map has shape {label.shape}", "give one 3D label map")
    world_to_voxel = np.linalg.inv(np.asarray(affine, float))
    frames = []
    for ds in datasets:
        iop = np.asarray(ds.ImageOrientationPatient, float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        origin = _LPS_TO_RAS @ np.asarray(ds.ImagePositionPatient, float)
        # pixel (r, c) sits at origin + c * col_spacing * row_dir + r * row_spacing * col_dir (PS3.3 C.7.6.2.1.1)
        step_c = _LPS_TO_RAS @ iop[:3] * col_spacing
        step_r = _LPS_TO_RAS @ iop[3:] * row_spacing
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        world = origin[:, None, None] + step_c[:, None, None] * c + step_r[:, None, None] * r
        index = np.tensordot(world_to_voxel[:3, :3], world, axes=1) + world_to_voxel[:3, 3, None, None]
        nearest = np.rint(index)
        if np.abs(index - nearest).max() > _GRID_TOL or any(
            nearest[a].min() < 0 or nearest[a].max() > label.shape[a] - 1 for a in range(3)
        ):
            raise InputError(None, "the label map is not on the DICOM series' grid",
                             "write it on the input's grid (the bundles' Invertd does) before DICOM-SEG")
        i, j, k = nearest.astype(np.int64)
        frames.append(label[i, j, k])
    return np.stack(frames)


def _concept(code: tuple[str, str, str]) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code[1], scheme_designator=code[0], meaning=code[2])


def segment_descriptions(ids: Sequence[int], names: Mapping[int, str], algorithm: str, version: str) -> list[Any]:
    """One highdicom ``SegmentDescription`` per label id (segment numbers 1..N in ``ids`` order)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    family = codes.cid7162.ArtificialIntelligence
    described = []
    for number, label_id in enumerate(ids, 1):
        name = names.get(int(label_id))
        if name not in SEGMENT_CODES:
            raise InputError(None, f"label id {label_id} ({name}) has no coded concept in custom.labels.SEGMENT_CODES",
                             "add it there")
        code = SEGMENT_CODES[name]
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=_concept(code.category),
            segmented_property_type=_concept(code.type),
            algorithm_type="AUTOMATIC",
            algorithm_identification=hd.AlgorithmIdentificationSequence(name=algorithm, family=family, version=version),
            tracking_id=name,
            tracking_uid=hd.UID(),
            anatomic_regions=[_concept(code.region)] if code.region else None,
            display_color=hd.color.CIELabColor.from_rgb(*code.rgb),
        )
        if code.modifier:  # laterality lives inside the type code item (PS3.3 C.8.20.2, CID 244)
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [_concept(code.modifier)]
        described.append(desc)
    return described


def write_dicom_seg(
    label: np.ndarray,
    affine: np.ndarray,
    series_dir: str | os.PathLike,
    output: str | os.PathLike,
    names: Mapping[int, str],
    algorithm: str = "swin_bob",
    version: str = "0.1.0",
    series_description: str = "Swin-BOB segmentation",
) -> Path:
    """Write ``label`` (on the series' grid, ``affine`` RAS) as a DICOM-SEG for ``series_dir``.

    Args:
        label: integer label map ``(X, Y, Z)`` or ``(1, X, Y, Z)``; 0 is background.
        affine: its voxel -> RAS (mm) affine.
        series_dir: folder of the source DICOM series.
        output: the ``.dcm`` file to write (atomically).
        names: label id -> structure name (``custom.labels`` taxonomies), for the coded concepts.
        algorithm, version: the AlgorithmIdentificationSequence (e.g. the bundle and its version).

    Returns ``output``. One BINARY segment per id present; frames without any segment are omitted.
    """
    import highdicom as hd

    datasets = read_series(series_dir)
    frames = label_to_frames(label, affine, datasets)
    ids = [int(i) for i in np.unique(frames) if i != 0]
    if not ids:
        raise InputError(None, "the label map holds no structure on the series", "a DICOM-SEG needs at least one segment")
    numbers = np.zeros(int(frames.max()) + 1, dtype=np.uint8 if len(ids) < 256 else np.uint16)
    numbers[ids] = np.arange(1, len(ids) + 1)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=numbers[frames],  # a label map of segment numbers
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(ids, names, algorithm, version),
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Swin-BOB bundles",
        manufacturer_model_name=algorithm,
        software_versions=version,
        device_serial_number="0",
        content_label="SEGMENTATION",
        content_description=f"{algorithm} {version}"[:64],
        series_description=series_description,
    )
    with atomic_path(output) as tmp:
        seg.save_as(tmp)
    return Path(output)


def nifti_to_dicom_seg(nifti: str | os.PathLike, series_dir: str | os.PathLike, output: str | os.PathLike,
                       names: Mapping[int, str], **kwargs: Any) -> Path:
    """A NIfTI label map written on the series' grid -> DICOM-SEG ``output`` (see :func:`write_dicom_seg`)."""
    import nibabel as nib

    img = nib.load(str(nifti))
    return write_dicom_seg(np.asarray(img.dataobj), img.affine, series_dir, output, names, **kwargs)


def dcmqi_label_info(ids: Sequence[int], names: Mapping[int, str], algorithm: str = "swin_bob") -> list[dict[str, Any]]:
    """MONAI Label's ``label_info`` for saving a label map as DICOM-SEG: one entry per id (ascending,
    as MONAI Label pairs them with the map's unique ids), each with the dcmqi ``segmentAttribute``
    carrying the coded concept and colour of ``custom.labels.SEGMENT_CODES``.

    MONAI Label's DICOMweb datastore writes a label saved with tag ``final`` through dcmqi's
    ``itkimage2segimage``; without these attributes every segment gets the same placeholder code.
    """

    def item(code: tuple[str, str, str]) -> dict[str, str]:
        return {"CodingSchemeDesignator": code[0], "CodeValue": code[1], "CodeMeaning": code[2]}

    info = []
    for label_id in sorted(int(i) for i in ids):
        name = names[label_id]
        code = SEGMENT_CODES[name]
        attribute = {
            "labelID": label_id, "SegmentLabel": name, "SegmentDescription": code.type[2],
            "SegmentAlgorithmType": "AUTOMATIC", "SegmentAlgorithmName": algorithm,
            "SegmentedPropertyCategoryCodeSequence": item(code.category),
            "SegmentedPropertyTypeCodeSequence": item(code.type),
            "recommendedDisplayRGBValue": list(code.rgb),
        }
        if code.modifier:
            attribute["SegmentedPropertyTypeModifierCodeSequence"] = item(code.modifier)
        if code.region:
            attribute["AnatomicRegionSequence"] = item(code.region)
        info.append({"name": name, "color": list(code.rgb), "model_name": algorithm, "segmentAttribute": attribute})
    return info


def bundle_version(metadata_file: str | os.PathLike | None) -> str:
    """A bundle's ``version`` from its ``metadata.json`` (``"unknown"`` without one), for the SEG's algorithm identification."""
    import json

    if metadata_file and Path(metadata_file).is_file():
        return str(json.loads(Path(metadata_file).read_text()).get("version", "unknown"))
    return "unknown"


def check_request(input_path: str | os.PathLike, output: str | os.PathLike) -> None:
    """What ``--output_type dicom_seg`` needs before any network runs: a series folder in, ``.dcm`` out."""
    read_series(input_path)
    if not str(output).endswith(".dcm"):
        raise InputError(output, "a DICOM-SEG output must be a .dcm file name", "end it with .dcm")


class SaveDicomSeg(Transform):
    """Array twin of :class:`SaveDicomSegd`: ``(1, X, Y, Z)`` label MetaTensor -> ``<output_dir>/<case>_<postfix>.dcm``.

    The source series is the label's ``meta["filename_or_obj"]`` (the DICOM folder the image was
    read from); its ``affine`` places it on that series' grid.
    """

    def __init__(self, output_dir: str | os.PathLike, names: Mapping[int, str], output_postfix: str = "seg",
                 algorithm: str = "swin_bob", version: str | None = None,
                 metadata_file: str | os.PathLike | None = None) -> None:
        self.output_dir, self.names, self.output_postfix = Path(output_dir), names, output_postfix
        self.algorithm, self.version = algorithm, version or bundle_version(metadata_file)

    def __call__(self, label: Any, series_dir: str | os.PathLike | None = None) -> Path:
        meta = getattr(label, "meta", {})
        source = Path(series_dir or source_name(label) or "")
        if not source.is_dir():
            raise InputError(source, "DICOM-SEG output needs a DICOM series folder as input",
                             "run with output_type nifti for NIfTI/NRRD inputs")
        array = label.detach().cpu().numpy() if hasattr(label, "detach") else np.asarray(label)
        affine = np.asarray(meta.get("affine", getattr(label, "affine", None)), float)
        out = self.output_dir / f"{source.name}_{self.output_postfix}.dcm"
        return write_dicom_seg(array.astype(np.int64), affine, source, out, self.names, self.algorithm, self.version)


class SaveDicomSegd(MapTransform):
    """Post-processing writer: ``data[key]`` label map (after ``Invertd`` + ``AsDiscreted``) -> a DICOM-SEG.

    ``inference.json`` chooses it with ``output_type`` (``"dicom_seg"``) in place of ``SaveImaged``;
    the written path goes to ``data["<key>_dicom_seg"]``. The data pass through unchanged otherwise.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, names: Mapping[int, str],
                 output_postfix: str = "seg", algorithm: str = "swin_bob", version: str | None = None,
                 metadata_file: str | os.PathLike | None = None) -> None:
        super().__init__(keys)
        self.writer = SaveDicomSeg(output_dir, names, output_postfix, algorithm, version, metadata_file)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_dicom_seg"] = str(self.writer(d[key]))
        return d
