"""Write segments on a reference volume's grid as files Slicer (and PACS) load as segmentations.

- ``write_seg_nrrd``: Slicer's own .seg.nrrd through slicerio: IDs, names, colours, terminology tags; overlapping
  segments go to extra layers (a 4D file), as Slicer stores them.
- ``write_nifti_labelmap``: one labelmap (segments must not overlap) plus a JSON sidecar of names and colours.
- ``write_dicom_seg``: a DICOM Segmentation object through highdicom, referencing the source DICOM series.
- ``write_segmentation``: picks one of these from the file name.

The output grid is the reference's exactly (its IJK-to-LPS matrix is written as is). Every writer goes through
``atomic.atomic_outputs``: nothing exists under the final name until it is complete, and nothing is replaced
without ``overwrite``.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from ..errors import GeometryError, InputError, OutputError
from .atomic import atomic_output, atomic_outputs, check_writable
from .output_names import FORMATS, output_format, sidecar_path
from .segments import Segment, complete
from .terminology import GENERIC_TERMINOLOGY
from .volume import Volume

PathLike = Union[str, os.PathLike]
SIDECAR_FORMAT = "medsegx-labels/1"


# ---- layers: how segments share labelmap voxels ---------------------------------------------------------------------
@dataclass
class _Layer:
    voxels: np.ndarray  # (k, j, i) uint32 while packing
    values: set = field(default_factory=set)

    def accepts(self, occupied: np.ndarray, values) -> bool:
        return not (self.values & set(values)) and not np.any(self.voxels[occupied])


def pack_layers(segments: Sequence[Segment], shape_kji: tuple) -> Tuple[List[np.ndarray], List[Tuple[int, int]]]:
    """Place segments in as few labelmap layers as their overlaps allow.

    Returns the layers (smallest unsigned dtype, ``(k, j, i)``) and each segment's ``(layer, label value)``.
    Segments that are labels of one labelmap travel together and keep their values (a TotalSegmentator map stays
    one layer with TotalSegmentator's ids); a mask segment takes the first layer where it overlaps nothing.
    """
    layers: List[_Layer] = []
    placement: List[Optional[Tuple[int, int]]] = [None] * len(segments)

    def layer_for(occupied, values) -> int:
        for index, layer in enumerate(layers):
            if layer.accepts(occupied, values):
                return index
        layers.append(_Layer(np.zeros(shape_kji, np.uint32)))
        return len(layers) - 1

    groups: Dict[int, List[int]] = {}
    for index, segment in enumerate(segments):
        if segment.mask is None:
            groups.setdefault(id(segment.labelmap), []).append(index)
    for members in groups.values():
        labelmap = segments[members[0]].labelmap
        values = [segments[i].label for i in members]
        block = np.where(np.isin(labelmap, values), labelmap, 0)
        occupied = block != 0
        target = layer_for(occupied, values)
        layers[target].voxels[occupied] = block[occupied]
        layers[target].values.update(values)
        for i in members:
            placement[i] = (target, int(segments[i].label))
    for index, segment in enumerate(segments):
        if segment.mask is not None:
            occupied = segment.binary_mask()
            target = layer_for(occupied, [])
            value = max(layers[target].values, default=0) + 1
            layers[target].voxels[occupied] = value
            layers[target].values.add(value)
            placement[index] = (target, value)
    top = max((max(layer.values, default=0) for layer in layers), default=0)
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
    return [layer.voxels.astype(dtype) for layer in layers], placement


# ---- .seg.nrrd -------------------------------------------------------------------------------------------------------
def write_seg_nrrd(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False) -> Path:
    """Slicer's .seg.nrrd: one layer, or a 4D file when segments overlap."""
    import slicerio

    check_writable(path, overwrite)
    segments = complete(segments, reference.array.shape)
    layers, placement = pack_layers(segments, reference.array.shape)
    # slicerio wants (i, j, k) [or (layer, i, j, k)] in Fortran order: the transpose of our C-order (k, j, i) stack
    # is exactly that, with no copy.
    voxels = layers[0].T if len(layers) == 1 else np.stack(layers, axis=-1).T
    entries = []
    for segment, (layer, value) in zip(segments, placement):
        entry = {"id": segment.id, "name": segment.name, "color": [round(c, 6) for c in segment.color],
                 "labelValue": value, "layer": layer}
        if segment.terminology is not None:
            entry["terminology"] = segment.terminology.to_slicerio()
        entries.append(entry)
    segmentation = {"voxels": voxels, "ijkToLPS": reference.ijk_to_lps, "segments": entries,
                    "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap",
                    "referenceImageExtentOffset": [0, 0, 0],
                    "conversionParameters": [{"name": "Reference image geometry",
                                              "value": reference_image_geometry(reference),
                                              # Slicer's reader needs each parameter to end with "&"
                                              "description": "Image geometry description string determining "
                                                             "the geometry of the labelmap that is created in "
                                                             "course of conversion.&"}]}
    with atomic_output(path, overwrite) as temp:
        slicerio.write_segmentation(str(temp), segmentation)
    return Path(path)


def reference_image_geometry(reference: Volume) -> str:
    """Slicer's "Reference image geometry" of a volume: its IJK-to-RAS matrix row by row, then its extent.

    Slicer exports a segmentation "with the reference geometry" onto this grid; without it the export is cropped
    to the segments' extent. The format is ``vtkSegmentationConverter::SerializeImageGeometry``'s.
    """
    matrix = ";".join(repr(float(v)) for v in reference.ijk_to_ras.ravel())
    extent = ";".join(f"0;{n - 1}" for n in reference.shape_ijk)
    return f"{matrix};{extent};"


# ---- NIfTI labelmap + sidecar ------------------------------------------------------------------------------------
def write_nifti_labelmap(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False,
                         sidecar: bool = True) -> Path:
    """One labelmap with the reference's geometry and a JSON sidecar (value -> name, colour, terminology)."""
    import SimpleITK as sitk

    paths = [Path(path)] + ([sidecar_path(path)] if sidecar else [])
    for target in paths:
        check_writable(target, overwrite)
    segments = complete(segments, reference.array.shape)
    layers, placement = pack_layers(segments, reference.array.shape)
    if len(layers) > 1:
        overlapping = [s.name for s, (layer, _) in zip(segments, placement) if layer > 0]
        raise OutputError(f"{path}: segments overlap ({', '.join(repr(n) for n in overlapping[:5])} overlap "
                          f"others), which one labelmap cannot hold; write a .seg.nrrd instead")
    labels = [{"value": value, "name": s.name, "color": [round(c, 6) for c in s.color], "id": s.id,
               "terminology": s.terminology.to_slicer_string() if s.terminology else None}
              for s, (_, value) in zip(segments, placement)]
    document = {"format": SIDECAR_FORMAT, "generator": f"medsegx {__version__}", "reference": reference.source,
                "labels": labels}
    with atomic_outputs(paths, overwrite) as temps:
        sitk.WriteImage(reference.to_sitk(layers[0]), str(temps[0]), True)
        if sidecar:
            temps[1].write_text(json.dumps(document, indent=1) + "\n")
    return Path(path)


# ---- DICOM SEG -----------------------------------------------------------------------------------------------------
def write_dicom_seg(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False,
                    source_dicom: Optional[PathLike] = None, series_description: str = "MedSegX segmentation",
                    algorithm_type: str = "AUTOMATIC") -> Path:
    """A DICOM SEG (binary, overlaps allowed) referencing the DICOM series the reference volume was read from.

    ``source_dicom``: the series folder (or one of its files); default: ``reference.source``.
    ``algorithm_type``: ``"AUTOMATIC"``/``"SEMIAUTOMATIC"`` (identifies MedSegX) or ``"MANUAL"``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    check_writable(path, overwrite)
    segments = complete(segments, reference.array.shape)
    sources = dicom_seg_sources(reference, source_dicom)
    pixel_array = np.stack([s.binary_mask() for s in segments], axis=-1).astype(np.uint8)  # (frames, rows, cols, S)
    algorithm = None if algorithm_type == "MANUAL" else hd.AlgorithmIdentificationSequence(
        name="MedSegX", family=codes.cid7162.ArtificialIntelligence, version=__version__)
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        terminology = segment.terminology or GENERIC_TERMINOLOGY  # DICOM requires a category and a type
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=segment.name[:64],
            segmented_property_category=hd.sr.CodedConcept(terminology.category.value, terminology.category.scheme,
                                                           terminology.category.meaning),
            segmented_property_type=hd.sr.CodedConcept(terminology.type.value, terminology.type.scheme,
                                                       terminology.type.meaning),
            algorithm_type=algorithm_type, algorithm_identification=algorithm, tracking_id=segment.id,
            tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*[round(255 * c) for c in segment.color])))
    with warnings.catch_warnings():
        # the source's own patient name may be a single component: the archive's business, not a reason to warn
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixel_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MedSegX",
            manufacturer_model_name="medsegx_core", software_versions=__version__, device_serial_number="none",
            series_description=series_description)
    with atomic_output(path, overwrite) as temp:
        seg.save_as(str(temp))
    return Path(path)


def dicom_seg_sources(reference: Volume, source_dicom: Optional[PathLike] = None, headers_only: bool = False) -> list:
    """The source series' datasets in the reference's k order, checked to lie on the reference grid.

    Call it with ``headers_only`` before a long inference to refuse a DICOM SEG that could not be written.
    Datasets whose SOP Class UID element is empty (some PACS exports) get it from their file meta, where
    ``MediaStorageSOPClassUID`` holds the same value.
    """
    import pydicom

    from .readers import dicom_series_files, is_dicom_file

    source = Path(source_dicom or reference.source or "")
    if not str(source) or not source.exists() or (source.is_file() and not is_dicom_file(source)):
        raise OutputError(f"DICOM SEG needs the source DICOM series, but the reference was read from "
                          f"{reference.source or 'memory'}; write .seg.nrrd or .nii.gz instead")
    files = dicom_series_files(source.parent, source) if source.is_file() else dicom_series_files(source)
    by_k = {}
    for name in files:
        dataset = pydicom.dcmread(name, stop_before_pixels=headers_only)
        _fill_uids_from_file_meta(dataset, name)
        ijk = reference.lps_to_ijk_points(np.asarray(dataset.ImagePositionPatient, dtype=float))
        k = int(round(ijk[2]))
        if (not np.allclose(ijk[:2], 0, atol=1e-3) or abs(ijk[2] - k) > 1e-3 or
                (int(dataset.Columns), int(dataset.Rows)) != reference.shape_ijk[:2]):
            raise GeometryError(f"{name}: this DICOM slice does not lie on the reference volume's grid; the "
                                f"segmentation must be made on the series it references")
        if "SpecificCharacterSet" in dataset and not dataset.SpecificCharacterSet:
            del dataset.SpecificCharacterSet  # empty means the default repertoire; highdicom rejects the empty value
        by_k[k] = dataset
    if sorted(by_k) != list(range(reference.shape_ijk[2])):
        raise GeometryError(f"{source}: its {len(files)} slices do not cover the reference volume's "
                            f"{reference.shape_ijk[2]} slices")
    return [by_k[k] for k in range(reference.shape_ijk[2])]


def _fill_uids_from_file_meta(dataset, name) -> None:
    """An empty SOPClassUID / SOPInstanceUID element takes the value the file meta information gives."""
    meta = getattr(dataset, "file_meta", None)
    for element, meta_element in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if str(dataset.get(element, "") or "").strip():
            continue
        value = str(meta.get(meta_element, "") or "").strip() if meta is not None else ""
        if not value:
            raise InputError(f"{name}: this DICOM file has no {element} (neither in the dataset nor in its file "
                             f"meta information); a DICOM SEG cannot reference it")
        setattr(dataset, element, value)


# ---- by file name ------------------------------------------------------------------------------------------------
def write_segmentation(path: PathLike, reference: Volume, segments: Sequence[Segment], overwrite: bool = False,
                       source_dicom: Optional[PathLike] = None, format: Optional[str] = None) -> Path:
    """Write with the writer ``format`` names, or the one the file name asks for."""
    kind = format or output_format(path)
    if kind not in FORMATS:
        raise OutputError(f"{path}: unknown output format {kind!r}; choose one of {', '.join(FORMATS)}")
    if kind == "seg.nrrd":
        return write_seg_nrrd(path, reference, segments, overwrite)
    if kind == "nifti":
        if output_format(path) != "nifti":  # ITK picks its NIfTI writer from the name
            raise OutputError(f"{path}: a NIfTI labelmap needs a name ending in .nii.gz or .nii")
        return write_nifti_labelmap(path, reference, segments, overwrite)
    return write_dicom_seg(path, reference, segments, overwrite, source_dicom)
