"""A corpus of broken inputs, made by the tests themselves, for the bad-input matrix of every entry point.

Each case writes a real file (SimpleITK, nibabel, pydicom, torch, safetensors) into a folder and says which words
the one-line refusal must hold. Entry points (``medsegx info/segment/convert/finetune/weights import`` and the Slicer
batch script) run every case: see Testing/engine/test_bad_inputs.py and Testing/slicer_logic/test_batch_bad_inputs.py.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import SimpleITK as sitk

SHAPE_KJI = (12, 28, 24)


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], Path]   # writes the case under the given folder, returns the path to pass
    problem: str                   # words the error line must hold (besides the path)
    # 'medsegx segment' takes a one-slice file for a 2D image (MedSegX slice mode) and refuses it for SegVol
    # weights with these words instead
    segment_problem: str = ""

    def problems(self, entry: str) -> tuple:
        return (self.problem, self.segment_problem) if entry == "segment" and self.segment_problem else \
            (self.problem,)


# ---- a good input to break ----------------------------------------------------------------------------------------
def ct_array() -> np.ndarray:
    """A small CT-like int16 volume: air around a soft-tissue body holding a brighter ellipsoid 'organ'."""
    k, j, i = np.indices(SHAPE_KJI)
    body = ((j - 14) / 12.0) ** 2 + ((i - 12) / 11.0) ** 2 <= 1.0
    organ = ((k - 6) / 4.0) ** 2 + ((j - 12) / 6.0) ** 2 + ((i - 10) / 5.0) ** 2 <= 1.0
    array = np.full(SHAPE_KJI, -1000, np.int16)
    array[body] = 40
    array[organ] = 110
    return array


def organ_labels() -> np.ndarray:
    return (ct_array() == 110).astype(np.uint8)


def write_image(path: Path, array: np.ndarray, vector: bool = False, spacing=(1.5, 1.5, 3.0)) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()] + (1.0,) * max(0, image.GetDimension() - len(spacing)))
    sitk.WriteImage(image, str(path), True)
    return path


def good_ct(folder: Path) -> Path:
    return write_image(folder / "ct.nii.gz", ct_array())


def good_labels(folder: Path) -> Path:
    return write_image(folder / "ct_labels.nii.gz", organ_labels())


def good_inputs(root: Path) -> Dict[str, Path]:
    """A readable CT and its labels in ``root/good``: the inputs a case does not break."""
    folder = root / "good"
    folder.mkdir()
    return {"ct": good_ct(folder), "labels": good_labels(folder)}


# ---- broken volumes -----------------------------------------------------------------------------------------------
def _truncated(folder: Path) -> Path:
    whole = write_image(folder / "whole.nii", ct_array().repeat(4, axis=0))  # large enough to cut in the data
    path = folder / "truncated.nii.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    whole.unlink()
    return path


def _bytes(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content)
        return path
    return make


def _image(name: str, array_fn: Callable[[], np.ndarray], vector: bool = False) -> Callable[[Path], Path]:
    return lambda folder: write_image(folder / name, array_fn(), vector=vector)


def _with(value) -> np.ndarray:
    array = ct_array().astype(np.float32)
    array[6, 10:12, 8] = value
    return array


def _folder(name: str, files: Dict[str, bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.mkdir()
        for file_name, content in files.items():
            (path / file_name).write_bytes(content)
        return path
    return make


VOLUMES: Dict[str, Case] = {
    "truncated .nii.gz": Case(_truncated, "truncated"),
    "random bytes .nii.gz": Case(_bytes("random.nii.gz", np.random.default_rng(0).bytes(3000)),
                                 "unsupported or unrecognised"),
    "empty file .nii.gz": Case(_bytes("empty.nii.gz", b""), "unsupported or unrecognised"),
    "text renamed .nii": Case(_bytes("notes.nii", b"patient list\nnot an image\n" * 30), "unsupported or unrecognised"),
    "2D image": Case(_image("slice.nrrd", lambda: ct_array()[6]), "a 2D image"),
    "single slice": Case(_image("one_slice.nii.gz", lambda: ct_array()[6:7]), "a single slice",
                         segment_problem="is a 2D image, but the weights"),
    "single voxel": Case(_image("voxel.nii.gz", lambda: ct_array()[6:7, 12:13, 10:11]), "a single voxel"),
    "RGB image": Case(_image("rgb.nrrd", lambda: np.stack([ct_array().clip(0, 255).astype(np.uint8)] * 3, -1),
                             vector=True), "RGB or vector"),
    "4D image": Case(_image("4d.nii.gz", lambda: np.stack([ct_array()] * 3)), "a 4D image"),
    "NaN voxels (NIfTI)": Case(_image("nan.nii.gz", lambda: _with(np.nan)), "2 voxels are NaN or infinite"),
    "Inf voxels (NRRD)": Case(_image("inf.nrrd", lambda: _with(np.inf)), "2 voxels are NaN or infinite"),
    "constant": Case(_image("blank.nii.gz", lambda: np.full(SHAPE_KJI, 7, np.int16)), "every voxel is 7"),
    "empty folder": Case(_folder("empty_dicom", {}), "an empty folder"),
    "folder without DICOM": Case(_folder("not_dicom", {"readme.txt": b"the scans are elsewhere"}),
                                 "no DICOM files in this folder"),
}
# What 'medsegx info' shows rather than refuses: a blank volume is a readable volume (info says it is blank).
INFO_ACCEPTS = {"constant": "blank"}


# ---- broken weights -----------------------------------------------------------------------------------------------
class NotWeights:
    """Pickled into a checkpoint: loading it would need arbitrary unpickling."""


class Malicious:
    """Unpickling this runs a shell command that creates ``marker``: it must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_save(name: str, content: Callable[[Path], object]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        import torch

        path = folder / name
        torch.save(content(folder), path)
        return path
    return make


def _plain_pickle(folder: Path) -> Path:
    path = folder / "weights.pkl"
    with open(path, "wb") as stream:
        pickle.dump({"image_encoder.patch_embedding.weight": [0.0, 1.0]}, stream)
    return path


def _wrong_shapes(reference: Path) -> Callable[[Path], Path]:
    """The fixture's checkpoint with one tensor of the wrong shape (a real safetensors file)."""
    def make(folder: Path) -> Path:
        from safetensors.torch import load_file, save_file

        state = load_file(str(reference))
        key = next(k for k in sorted(state) if k.startswith("mask_decoder.") and state[k].ndim == 2)
        state[key] = state[key][:, :-1].contiguous()
        path = folder / "wrong_shapes.safetensors"
        save_file(state, str(path))
        return path
    return make


def _truncated_checkpoint(reference: Path) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        import torch
        from safetensors.torch import load_file

        whole = folder / "whole.pth"
        torch.save(load_file(str(reference)), whole)
        path = folder / "truncated.pth"
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        whole.unlink()
        return path
    return make


MALICIOUS_MARKER = "MALICIOUS_CODE_RAN"


def checkpoints(reference: Path) -> Dict[str, Case]:
    """Broken weights; ``reference`` is a real safetensors checkpoint (the parity fixture's tiny SegVol)."""
    return {
        "pickled object": Case(_torch_save("pickled.pth", lambda f: {"model": NotWeights()}),
                               "needs arbitrary code to be unpickled"),
        "malicious pickle": Case(_torch_save("malicious.pth", lambda f: {"model": Malicious(f / MALICIOUS_MARKER)}),
                                 "refusing to load it"),
        "plain Python pickle": Case(_plain_pickle, "a plain Python pickle"),
        "wrong shapes": Case(_wrong_shapes(reference), "shape"),
        "truncated checkpoint": Case(_truncated_checkpoint(reference), "truncated or damaged"),
        "random bytes": Case(_bytes("random.bin", np.random.default_rng(1).bytes(4000)), "not a readable"),
        "empty file": Case(_bytes("empty.pth", b""), "an empty file"),
        "a NIfTI image": Case(lambda folder: write_image(folder / "ct_as_weights.nii.gz", ct_array()),
                              "not a checkpoint"),
    }


# ---- what a refusal must look like --------------------------------------------------------------------------------
def visible_lines(stream: str) -> List[str]:
    """The lines a terminal would show: a progress bar's carriage-return redraws collapse to what stays."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in stream.split("\n")]
    return [line for line in lines if line.strip()]


def check_refusal(code: int, err: str, prefix: str, path: Path, problem) -> str:
    """Exit 1, no traceback, and exactly one visible stderr line '<prefix>error: <path>...' holding ``problem``
    (or one of several wordings, a tuple)."""
    assert "Traceback" not in err and "overwrite=True" not in err, err  # no Python wording on a command line
    lines = visible_lines(err)
    assert code == 1, (code, err)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"{prefix}error: "), line
    problems = problem if isinstance(problem, tuple) else (problem,)
    assert str(path) in line and any(p in line for p in problems), (str(path), problems, line)
    return line


def folder_state(folder: Path) -> Dict[str, tuple]:
    """Every file under ``folder`` with its size, modification time and content digest."""
    import hashlib

    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def output_folder(root: Path) -> Path:
    """An output folder holding a file the user had, which no run may touch."""
    folder = root / "out"
    folder.mkdir()
    (folder / "earlier_result.seg.nrrd").write_bytes(b"the user's earlier result")
    return folder
