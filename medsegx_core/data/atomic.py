"""Write outputs so that a user's files are never half-written or silently replaced.

Every output goes to a hidden temporary file in the destination folder (same file system, so the final
``os.replace`` is atomic) and is renamed only when all of them were written. The temporary name keeps the real
name's full suffix (``.seg.nrrd``, ``.nii.gz``) because ITK and pynrrd choose the format from it.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Sequence, Union

from ..errors import OutputError

PathLike = Union[str, os.PathLike]


def check_writable(path: PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work is done, an output that exists (without ``overwrite``) or cannot be created."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the output")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it, or choose another name")
    folder = path.parent
    if not folder.exists():
        raise OutputError(f"{path}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK) or not _can_create_in(folder):
        raise OutputError(f"{path}: the folder {folder} is not writable; choose another output folder")
    return path


def _can_create_in(folder: Path) -> bool:
    """Whether a file can really be created there (``os.access`` says yes to root on read-only file systems)."""
    probe = folder / f".medsegx-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
    except OSError:
        return False
    try:
        probe.unlink()
    except OSError:
        pass
    return True


@contextmanager
def atomic_outputs(paths: Sequence[PathLike], overwrite: bool = False) -> Iterator[List[Path]]:
    """Yield temporary paths to write; on success rename them all onto ``paths``, on any failure remove them.

    >>> with atomic_outputs(["seg.nii.gz", "seg.json"]) as (image_tmp, sidecar_tmp):
    ...     write(image_tmp); write(sidecar_tmp)
    """
    targets = [check_writable(p, overwrite) for p in paths]
    token = uuid.uuid4().hex[:8]
    temps = [t.parent / f".{t.name}.partial-{token}{_full_suffix(t)}" for t in targets]
    try:
        yield temps
        missing = [str(t) for t in temps if not t.exists()]
        if missing:
            raise OutputError(f"{targets[0]}: the writer produced no file ({', '.join(missing)})")
        for temp, target in zip(temps, targets):
            os.replace(temp, target)
    except OSError as exc:
        raise OutputError(f"{targets[0]}: cannot write the output ({exc.strerror or exc}); nothing was "
                          f"replaced") from None
    except RuntimeError as exc:  # ITK reports write failures as RuntimeError
        reason = " ".join(str(exc).split())[-160:]
        raise OutputError(f"{targets[0]}: cannot write the output ({reason}); nothing was replaced") from None
    finally:
        for temp in temps:
            if temp.exists():
                try:
                    temp.unlink()
                except OSError:
                    pass


@contextmanager
def atomic_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """One-file form of ``atomic_outputs``."""
    with atomic_outputs([path], overwrite) as (temp,):
        yield temp


def _full_suffix(path: Path) -> str:
    """``.seg.nrrd``, ``.nii.gz``, ``.dcm``: the suffixes format detection looks at."""
    name = path.name.lower()
    for double in (".seg.nrrd", ".seg.nii.gz", ".nii.gz"):
        if name.endswith(double):
            return path.name[-len(double):]
    return path.suffix
