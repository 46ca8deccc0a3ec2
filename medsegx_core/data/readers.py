"""Read a 3D scalar image from disk into a ``Volume``, or refuse it with one line saying why.

Formats: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) through SimpleITK; FreeSurfer
(.mgz, .mgh) through nibabel (ITK has no reader for it); DICOM series (a folder, or any one file of the series)
through SimpleITK/GDCM, which also decodes the compressed transfer syntaxes GDCM supports (JPEG, JPEG-LS,
JPEG 2000, RLE). The modality comes from the DICOM Modality tag when there is one.

Everything a user can get wrong is an ``InputError`` naming the file: missing, unsupported, corrupt or truncated,
2D, 4D, RGB/vector, complex, NaN/Inf voxels, an empty folder or one without DICOM. ``read_labelmap`` adds a
``GeometryError`` when the labelmap is not on the reference's grid.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from ..errors import GeometryError, InputError
from ..progress import CancelToken, ProgressCallback, check, report
from .volume import Volume

PathLike = Union[str, os.PathLike]

SUPPORTED = "NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd), FreeSurfer (.mgz/.mgh) or a DICOM series"
FREESURFER_SUFFIXES = (".mgz", ".mgh")
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
# DICOM objects that share folders with images but are not images to segment.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "RWV", "FID"}


# ---- public API ----------------------------------------------------------------------------------------------------
def read_volume(path: PathLike, series_uid: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> Volume:
    """Read a 3D scalar volume; ``series_uid`` picks one DICOM series when a folder holds several."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    check(cancel)
    report(progress, 0.0, f"reading {path.name}")
    if path.is_dir():
        volume = _read_dicom(path, None, series_uid, progress, cancel)
    elif _lower_name(path).endswith(FREESURFER_SUFFIXES):
        volume = _read_freesurfer(path)
    elif is_dicom_file(path):
        volume = _read_dicom(path.parent, path, series_uid, progress, cancel)
    else:
        volume = _read_itk_file(path, progress, cancel)
    _check_voxels(path, volume.array)
    report(progress, 1.0, f"read {path.name}")
    return volume


def read_labelmap(path: PathLike, reference: Volume, tol: float = 1e-3) -> Volume:
    """Read an integer labelmap that must lie on ``reference``'s grid; returns it with the reference's geometry.

    ``tol`` (mm) absorbs the float32 rounding of NIfTI headers; anything larger is a ``GeometryError``, since
    silently resampling would move every label.
    """
    labels = read_volume(path)
    difference = reference.grid_difference(labels, tol)
    if difference is not None:
        name = reference.source or "the reference volume"
        raise GeometryError(f"labelmap {path} is not on the grid of {name}: {difference}; resample it onto the "
                            f"reference (nearest neighbour) or pick the matching reference")
    array = labels.array
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise InputError(f"{path}: a labelmap needs whole-number labels, found fractional values "
                             f"(is this an image rather than a labelmap?)")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise InputError(f"{path}: a labelmap needs labels >= 0, found {int(array.min())}")
    # The reference's exact geometry, so outputs built from this labelmap match the image bit for bit.
    return replace(reference, array=_smallest_uint(array), modality=None, source=str(path))


def dicom_series_files(folder: PathLike, member: Optional[PathLike] = None,
                       series_uid: Optional[str] = None) -> List[str]:
    """The files of one DICOM image series in ``folder``, in GDCM's slice order.

    The series is the one holding ``member``, or ``series_uid``, or the only image series in the folder.
    Non-image objects (SEG, RTSTRUCT, SR, ...) are skipped, so a folder holding a CT and its DICOM SEG works.
    """
    import pydicom
    import SimpleITK as sitk

    folder = Path(folder)
    entries = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if not entries:
        raise InputError(f"{folder}: empty folder; point at a folder holding one DICOM series, or at an image file")
    series_reader = sitk.ImageSeriesReader()
    series = {}
    for uid in series_reader.GetGDCMSeriesIDs(str(folder)):
        files = list(series_reader.GetGDCMSeriesFileNames(str(folder), uid))
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        if str(header.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES:
            series[uid] = (files, header)
    if not series:
        raise InputError(f"{folder}: no DICOM image series found among its {len(entries)} files; "
                         f"point at a folder holding one DICOM series, or at an image file ({SUPPORTED})")
    _refuse_undecodable_members(folder, entries, series_reader, series)
    if member is not None:
        member_path = os.path.realpath(member)
        matches = [uid for uid, (files, _) in series.items()
                   if any(os.path.realpath(f) == member_path for f in files)]
        if not matches:
            raise InputError(f"{member}: not part of any DICOM image series in {folder} (a SEG or report object?)")
        return series[matches[0]][0]
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"{folder}: no DICOM image series with SeriesInstanceUID {series_uid}; "
                             f"it holds {', '.join(series)}")
        return series[series_uid][0]
    if len(series) > 1:
        listing = "; ".join(f"{uid} ({header.get('SeriesDescription', 'no description')}, {len(files)} files)"
                            for uid, (files, header) in series.items())
        raise InputError(f"{folder}: holds {len(series)} DICOM image series ({listing}); "
                         f"pass one file of the wanted series, or its series UID")
    return next(iter(series.values()))[0]


def _refuse_undecodable_members(folder: Path, entries, series_reader, series: dict) -> None:
    """GDCM silently leaves out files it cannot parse, which would shorten a series without a word: refuse."""
    import pydicom

    grouped = {os.path.realpath(f) for uid in series_reader.GetGDCMSeriesIDs(str(folder))
               for f in series_reader.GetGDCMSeriesFileNames(str(folder), uid)}
    for entry in entries:
        if os.path.realpath(entry) in grouped or not is_dicom_file(entry):
            continue
        try:
            uid = pydicom.dcmread(entry, stop_before_pixels=True).get("SeriesInstanceUID")
        except Exception as exc:
            raise InputError(f"{entry}: a damaged DICOM file in the series folder ({_one_line(exc)}); "
                             f"copy it again or remove it") from None
        if uid in series or not series:
            raise InputError(f"{entry}: a DICOM file of this series that cannot be decoded (truncated or corrupt); "
                             f"copy it again or remove it")


def _check_even_slices(folder: Path, files: List[str]) -> None:
    """A missing slice makes ITK stretch the spacing without error; insist on evenly spaced slices."""
    import pydicom

    positions, normal = [], None
    for name in files:
        header = pydicom.dcmread(name, stop_before_pixels=True)
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            return  # no patient geometry to check (rare secondary captures); ITK's own layout stands
        if normal is None:
            row, col = np.asarray(header.ImageOrientationPatient, dtype=float).reshape(2, 3)
            normal = np.cross(row, col)
        positions.append(float(np.dot(normal, np.asarray(header.ImagePositionPatient, dtype=float))))
    gaps = np.diff(np.sort(positions))
    if len(gaps) and (gaps.min() <= 1e-3 or gaps.max() - gaps.min() > 0.01 * gaps.max() + 1e-3):
        raise InputError(f"{folder}: slices are unevenly spaced (gaps {gaps.min():.3f} to {gaps.max():.3f} mm): a "
                         f"slice is missing or duplicated, or the folder mixes acquisitions; fix the series first")


# ---- formats -------------------------------------------------------------------------------------------------------
def _read_itk_file(path: Path, progress, cancel) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        if "Unable to determine ImageIO reader" in reason:
            raise InputError(f"{path}: unsupported or unrecognised image format; use {SUPPORTED}") from None
        raise InputError(f"{path}: cannot read the image header ({reason}); the file is corrupt or not an image")
    _check_layout(path, list(reader.GetSize()), reader.GetNumberOfComponents(),
                  sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    if _lower_name(path).endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)  # ITK reads a truncated NIfTI without complaint, padding it with garbage
    image = _execute_with_progress(reader, path, progress, cancel)
    image = _drop_single_time_point(image)
    return Volume.from_sitk(image, modality=None, source=str(path))


def _read_freesurfer(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types (EOFError, zlib.error, ImageFileError, ValueError)
        raise InputError(f"{path}: cannot read this FreeSurfer file ({type(exc).__name__}: {_one_line(exc)}); "
                         f"it is corrupt or truncated") from None
    shape = list(data.shape)
    _check_layout(path, shape, 1, str(data.dtype))
    if data.ndim == 4:
        data = data[..., 0]
    affine = np.asarray(image.affine, dtype=float)  # voxel (i, j, k) -> RAS mm, as FreeSurfer defines it
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # nibabel (i, j, k) -> our (k, j, i)
    if not array.dtype.isnative:  # .mgz is big-endian on disk
        array = array.astype(array.dtype.newbyteorder("="))
    return Volume(array, tuple(spacing), affine[:3, 3], affine[:3, :3] / spacing, modality=None, source=str(path))


def _read_dicom(folder: Path, member: Optional[Path], series_uid, progress, cancel) -> Volume:
    import pydicom
    import SimpleITK as sitk

    files = dicom_series_files(folder, member, series_uid)
    _check_even_slices(folder, files)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = _execute_with_progress(reader, folder, progress, cancel)
    _check_layout(folder, list(image.GetSize()), image.GetNumberOfComponentsPerPixel(),
                  image.GetPixelIDTypeAsString())
    modality = str(header.get("Modality", "")).upper() or None
    return Volume.from_sitk(image, modality=modality, source=str(folder))


# ---- checks --------------------------------------------------------------------------------------------------------
def _check_layout(path: Path, size: list, components: int, pixel_type: str) -> None:
    """Refuse what is not one 3D scalar volume, before the voxels are read where possible."""
    if "complex" in pixel_type.lower():
        raise InputError(f"{path}: complex-valued voxels ({pixel_type}); a real scalar volume is needed")
    if components > 1:
        raise InputError(f"{path}: {components} values per voxel (an RGB or vector image); a single-channel "
                         f"(grey-level) volume is needed")
    if len(size) == 4 and size[3] == 1:
        size = size[:3]  # one time point stored as 4D: still a 3D volume
    if len(size) > 3:
        raise InputError(f"{path}: a {len(size)}D image (size {tuple(size)}); a single 3D volume is needed, "
                         f"extract one time point or channel first")
    if len(size) < 3 or min(size) < 2:
        raise InputError(f"{path}: a 2D image (size {tuple(size)}); a 3D volume with at least 2 voxels along "
                         f"each axis is needed")


def _check_voxels(path: Path, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(f"{path}: {bad} voxels are NaN or infinite; replace them with a finite value "
                             f"(e.g. the background intensity) before segmenting")


def _check_nifti_complete(path: Path) -> None:
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        needed = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as exc:
        raise InputError(f"{path}: cannot read the NIfTI header ({_one_line(exc)}); the file is corrupt") from None
    try:
        if _lower_name(path).endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                available = sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 22), b""))
        else:
            available = path.stat().st_size
    except (EOFError, OSError, zlib.error):
        raise InputError(f"{path}: the compressed data ends early or is damaged; the file is truncated or corrupt, "
                         f"copy it again") from None
    if available < needed:
        raise InputError(f"{path}: holds {available} bytes of data where its header needs {needed}; the file is "
                         f"truncated, copy it again")


# ---- helpers -------------------------------------------------------------------------------------------------------
def _execute_with_progress(reader, path: Path, progress, cancel):
    import SimpleITK as sitk

    def on_progress():
        report(progress, reader.GetProgress(), f"reading {path.name}")
        if cancel is not None and cancel.cancelled:
            reader.Abort()

    if progress is not None or cancel is not None:
        reader.AddCommand(sitk.sitkProgressEvent, on_progress)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        check(cancel)  # an abort we asked for is a cancellation, not a corrupt file
        raise InputError(f"{path}: cannot read the voxels ({_itk_reason(exc)}); the file is corrupt or "
                         f"truncated, or uses a compression GDCM cannot decode") from None
    finally:
        reader.RemoveAllCommands()


def _drop_single_time_point(image):
    import SimpleITK as sitk

    if image.GetDimension() == 4:
        size = list(image.GetSize())
        return sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    return image


def is_dicom_file(path: Path) -> bool:
    if _lower_name(path).endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:132] == b"DICM"  # the Part 10 preamble marker
    except OSError:
        return False


def _smallest_uint(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    return array.astype(np.int64, copy=False)


def _lower_name(path: Path) -> str:
    return path.name.lower()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _itk_reason(exc: BaseException) -> str:
    """The useful last line of an ITK exception, without source paths and object addresses."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    reason = re.sub(r"^(sitk::ERROR:|ITK ERROR:)\s*(\w+\(0x[0-9a-f]+\):)?\s*", "", reason)
    if reason.startswith("Reason: No such file"):  # ITK's errno is stale after a short read of an existing file
        reason = "the data ends early"
    return reason[:200]


__all__ = ["read_volume", "read_labelmap", "dicom_series_files", "SUPPORTED"]
