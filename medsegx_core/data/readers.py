"""Read a 3D scalar image from disk into a ``Volume``, or refuse it with one line saying why.

Formats: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) through SimpleITK; FreeSurfer
(.mgz, .mgh) through nibabel (ITK has no reader for it); DICOM series (a folder, or any one file of the series)
through SimpleITK/GDCM, which also decodes the compressed transfer syntaxes GDCM supports (JPEG, JPEG-LS,
JPEG 2000, RLE). The modality comes from the DICOM Modality tag when there is one.

Everything a user can get wrong is an ``InputError`` naming the file: missing, unsupported, corrupt or truncated,
2D, 4D, RGB/vector, complex, NaN/Inf voxels, an empty folder or one without DICOM. The rules themselves live in
``validation.py`` (shared with the Slicer module and the other entry points). ``read_labelmap`` adds a
``GeometryError`` when the labelmap is not on the reference's grid. What ITK, GDCM or OpenJPEG print on the
process's stderr while reading is held back: the ``InputError`` says what went wrong, in one line.

ITK's NIfTI reader silently turns NaN and infinite voxels into 0, and reads a truncated file padded with
zeros; both are found by reading the file's data once more with a plain stream (``_scan_nifti``).
"""
from __future__ import annotations

import gzip
import os
import re
import sys
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from ..errors import GeometryError, InputError
from ..progress import CancelToken, ProgressCallback, check, report
from .validation import blank_value, check_finite, check_layout, check_volume, count_nonfinite
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
    check_volume(volume, path)
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
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if folder.is_dir() else []
    if not entries:
        raise InputError(f"{folder}: an empty folder; point at a folder holding one DICOM series, or at an image "
                         f"file ({SUPPORTED})")
    dicom_entries = [p for p in entries if is_dicom_file(p)]
    if not dicom_entries:
        others = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise InputError(f"{folder}: no DICOM files in this folder (it holds {_count(len(entries), 'other file')}: "
                         f"{others}); point at a folder holding one DICOM series, or at an image file ({SUPPORTED})")
    series_reader = sitk.ImageSeriesReader()
    series = {}
    with _quiet_native_output():
        found = {uid: list(series_reader.GetGDCMSeriesFileNames(str(folder), uid))
                 for uid in series_reader.GetGDCMSeriesIDs(str(folder))}
    for uid, files in found.items():
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        if str(header.get("Modality", "")).upper() not in NON_IMAGE_MODALITIES:
            series[uid] = (files, header)
    if not series:
        raise InputError(f"{folder}: no DICOM image series among its {_count(len(dicom_entries), 'DICOM file')} "
                         f"(only segmentations, reports or files GDCM cannot parse); point at a folder holding one "
                         f"DICOM series, or at an image file ({SUPPORTED})")
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

    with _quiet_native_output():
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

    try:
        reader = _header(path)
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        if "Unable to determine ImageIO reader" in reason:
            raise InputError(f"{path}: unsupported or unrecognised image format; use {SUPPORTED}") from None
        raise InputError(f"{path}: cannot read the image header ({reason}); the file is corrupt or not an image")
    check_layout(path, list(reader.GetSize()), reader.GetNumberOfComponents(),
                 sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    if _lower_name(path).endswith((".nii", ".nii.gz")):
        _scan_nifti(path)  # ITK reads a truncated NIfTI padded with zeros, and NaN/Inf voxels as 0
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
    check_layout(path, shape, 1, str(data.dtype))
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
    check_layout(folder, list(image.GetSize()), image.GetNumberOfComponentsPerPixel(),
                 image.GetPixelIDTypeAsString())
    modality = str(header.get("Modality", "")).upper() or None
    return Volume.from_sitk(image, modality=modality, source=str(folder))


# ---- checks ----------------------------------------------------------------------------------------------------------
def _scan_nifti(path: Path) -> None:
    """Refuse a NIfTI whose data is shorter than its header says, or holds NaN/infinite voxels (one pass)."""
    import nibabel as nib

    try:
        proxy = nib.load(str(path)).dataobj  # its offset is right where the header's says 0 (ITK writes that)
        offset, dtype = int(proxy.offset), np.dtype(proxy.dtype)
        needed = offset + int(np.prod(proxy.shape)) * dtype.itemsize
    except Exception as exc:
        raise InputError(f"{path}: cannot read the NIfTI header ({_one_line(exc)}); the file is corrupt") from None
    floating = dtype.kind == "f"
    available, nonfinite, pending = 0, 0, b""
    try:
        opener = gzip.open if _lower_name(path).endswith(".gz") else open
        with opener(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                start = max(0, offset - available)
                stop = max(start, min(len(chunk), needed - available))
                available += len(chunk)
                if floating and stop > start:
                    data = pending + chunk[start:stop]
                    whole = len(data) - len(data) % dtype.itemsize
                    values = np.frombuffer(data[:whole], dtype=dtype)
                    nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
                    pending = data[whole:]
    except (EOFError, OSError, zlib.error):
        raise InputError(f"{path}: the compressed data ends early or is damaged; the file is truncated or corrupt, "
                         f"copy it again") from None
    if available < needed:
        raise InputError(f"{path}: holds {available} bytes of data where its header needs {needed}; the file is "
                         f"truncated, copy it again")
    check_finite(path, nonfinite)


# ---- 2D images (MedSegX slice mode) ----------------------------------------------------------------------------------
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SUPPORTED_2D = "PNG, JPEG, TIFF, BMP, a single-image DICOM file (X-ray) or a one-slice NIfTI/NRRD/MHA"


def is_2d_image(path: PathLike) -> bool:
    """Whether ``path`` is a 2D image (a picture, or a file whose image is one slice, such as a DICOM X-ray),
    decided from its name and header without reading the pixels; folders and volumes are not."""
    path = Path(path)
    if path.is_dir() or not path.is_file() or _lower_name(path).endswith(FREESURFER_SUFFIXES):
        return False
    if _lower_name(path).endswith(PICTURE_SUFFIXES):
        return True
    try:
        reader = _header(path)
    except RuntimeError:
        return False        # read_volume says why
    if not _is_one_slice(list(reader.GetSize())):
        return False        # a volume, or a single voxel or line of voxels: read_volume says which
    return not is_dicom_file(path) or len(dicom_series_files(path.parent, path)) == 1


def read_image_2d(path: PathLike) -> tuple:
    """A 2D image (``SUPPORTED_2D``) as ``(volume, rgb)``: a one-slice ``Volume`` (k = 1) of grey values (the
    luma of a colour image, for outputs and figures) and, for colour images, the ``(1, rows, cols, 3)`` uint8
    colours (else ``None``). Pictures have no patient geometry: pixel spacing from the file (1 mm when it has
    none), origin 0, slice thickness 1 mm. The modality comes from a DICOM header, else it is ``None``."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a 2D image ({SUPPORTED_2D})")
    try:
        reader = _header(path)
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read this image ({_itk_reason(exc)}); give a 2D image "
                         f"({SUPPORTED_2D})") from None
    size = list(reader.GetSize())
    if not _is_one_slice(size):
        raise InputError(f"{path}: not a 2D image (size {' x '.join(map(str, size))}); give one picture or one "
                         f"slice ({SUPPORTED_2D})")
    image = _execute_with_progress(reader, path, None, None)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])           # one slice, 1 mm thick, at k = 0
    components = image.GetNumberOfComponentsPerPixel()
    pixels = sitk.GetArrayFromImage(image)         # (1, rows, cols) or (1, rows, cols, components)
    rgb = None
    if components > 1:
        if components not in (3, 4) or pixels.dtype != np.uint8:
            raise InputError(f"{path}: {components} channels of {pixels.dtype}; MedSegX reads grey images and "
                             f"8-bit RGB(A) colour images: save it as one of those")
        rgb = np.ascontiguousarray(pixels[..., :3])
        grey = np.round(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
        image = _with_pixels(image, grey)
    elif "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{path}: complex-valued pixels; a real grey or colour image is needed")
    modality = None
    if is_dicom_file(path):
        import pydicom

        modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "")).upper() or None
    volume = Volume.from_sitk(image, modality=modality, source=str(path))
    check_finite(path, count_nonfinite(volume.array))
    if blank_value(volume.array) is not None:
        raise InputError(f"{path}: every pixel is {blank_value(volume.array):g} (a blank image); there is nothing "
                         f"to segment, check that this is the image you meant")
    return volume, rgb


def _is_one_slice(size: List[int]) -> bool:
    """A 2D image's size: two axes of at least 2 pixels, and no third axis or one of a single slice."""
    return (len(size) == 2 or (len(size) == 3 and size[2] == 1)) and min(size[:2]) >= 2


def _header(path: Path):
    """SimpleITK's reader for ``path`` with the header read (ITK's RuntimeError passes through; its chatter not)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _quiet_native_output():
        reader.ReadImageInformation()
    return reader


def _with_pixels(image, array: np.ndarray):
    import SimpleITK as sitk

    replaced = sitk.GetImageFromArray(array)
    replaced.CopyInformation(image)
    return replaced


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
        with _quiet_native_output():
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


@contextmanager
def _quiet_native_output():
    """Hold back what C++ libraries (ITK, GDCM, OpenJPEG) print on the process's stderr; the caller reports."""
    import SimpleITK as sitk

    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters): nothing to hold back
        saved = None
    try:
        if saved is None:
            yield
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


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


__all__ = ["read_volume", "read_labelmap", "dicom_series_files", "SUPPORTED", "read_image_2d", "is_2d_image",
           "SUPPORTED_2D"]
