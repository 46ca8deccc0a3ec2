"""Our weights format and ``load_model`` for every kind of weights a user may point at.

Our format is a folder::

    model.safetensors      the state dict with our key names (package-provided weights left out)
    config.json            {"medsegx_weights": 1, "model": <SegVolConfig>, "source": {...}}
    SHA256SUMS             sha256 of every file of the folder (sha256sum format), written last
    tokenizer files        copied from the published weights (tokenizer.json, vocab.json, ...)
    experts.safetensors    optional: an expert pack (ConMoAE experts trained with this base), attached on loading

``load_model`` accepts that folder, a published checkpoint file (tokenizer files beside it), or a published
folder (e.g. a download of ``BAAI/SegVol``: ``pytorch_model.bin`` + tokenizer files + its own config.json).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

from ..errors import OutputError, WeightsError
from ..modeling.build import build_model
from ..modeling.config import SegVolConfig
from ..modeling.segvol import SegVol
from ..modeling.text_encoder import TOKENIZER_FILES, has_tokenizer_files
from ..progress import CancelToken, ProgressCallback, check, report
from .checkpoints import CHECKPOINT_SUFFIXES, infer_config, load_state, read_checkpoint
from .expert_pack import EXPERT_STATE_PREFIX, base_state, load_expert_pack  # noqa: F401 - the prefix is API

FORMAT_KEY = "medsegx_weights"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "SHA256SUMS"
EXPERTS_FILE = "experts.safetensors"
KIND_KEY = "kind"                 # which model the folder holds; absent: SegVol (folders written before it)
SEGVOL_KIND, MEDSEGX2D_KIND = "segvol", "medsegx2d"
# Published checkpoint names, most preferred first, looked for inside a published folder.
PUBLISHED_NAMES = ("model.safetensors", "pytorch_model.bin", "SegVol_v1.pth")
TOKENIZER_SUBFOLDERS = (".", "tokenizer", "clip", "config/clip")

PathLike = Union[str, Path]


def sha256_of(path: PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def is_our_weights_folder(folder: PathLike) -> bool:
    """Whether ``folder`` is in this project's weights-folder format (a config record with our format key beside
    the weights file), whichever model kind it holds (the record's kind says which)."""
    config = Path(folder) / CONFIG_FILE
    if not config.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        return False
    try:
        return FORMAT_KEY in json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False


def find_tokenizer(folder: Path) -> Optional[Path]:
    """Tokenizer files shipped beside published weights: in the folder or a usual sub-folder of it."""
    for sub in TOKENIZER_SUBFOLDERS:
        candidate = (folder / sub)
        if candidate.is_dir() and has_tokenizer_files(candidate):
            return candidate
    return None


def find_published_checkpoint(folder: Path) -> Path:
    for name in PUBLISHED_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    listed = ", ".join(p.name for p in candidates) or "none"
    raise WeightsError(f"weights folder {folder}: expected our model.safetensors + config.json or one published "
                       f"checkpoint ({', '.join(PUBLISHED_NAMES)}); found checkpoint files: {listed}")


def read_config_record(folder: PathLike) -> Dict:
    return json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))


def weights_kind(path: PathLike) -> str:
    """``MEDSEGX2D_KIND`` for a folder of ours holding MedSegX's 2D slice model, else ``SEGVOL_KIND`` (any other
    weights, published files included: their loaders say what they are not)."""
    path = Path(path).expanduser()
    if path.is_dir() and is_our_weights_folder(path):
        return read_config_record(path).get(KIND_KEY, SEGVOL_KIND)
    return SEGVOL_KIND


# ---- loading --------------------------------------------------------------------------------------------
def load_model(path_or_folder: PathLike, tokenizer: Optional[PathLike] = None,
               config: Optional[Union[SegVolConfig, PathLike]] = None, device: Union[str, torch.device] = "cpu",
               verify: bool = False) -> SegVol:
    """A ready model (eval mode) from our folder, a published folder or a published checkpoint file.

    ``tokenizer``: a folder of tokenizer files when they are not beside the weights; ``config``: needed only for
    published checkpoints whose widths match no preset; ``verify``: check our folder's SHA256SUMS first."""
    path = Path(path_or_folder).expanduser()
    if not path.exists():
        raise WeightsError(f"weights {path}: no such file or folder; give a checkpoint file, a folder of "
                           f"published weights, or a folder made by 'medsegx weights import'")
    if isinstance(config, (str, Path)):
        config = SegVolConfig.from_json(config)
    if path.is_dir() and is_our_weights_folder(path):
        if verify:
            verify_folder(path)
        record = read_config_record(path)
        if record.get(KIND_KEY, SEGVOL_KIND) != SEGVOL_KIND:
            raise WeightsError(f"weights {path}: a {record[KIND_KEY]} model (MedSegX's 2D slice model), not a "
                               f"volumetric SegVol model; use it for slice mode (a box on one slice, "
                               f"'medsegx segment IMAGE --box ...'), or choose SegVol weights")
        model_config = config or SegVolConfig.from_dict(record["model"], source=str(path / CONFIG_FILE))
        checkpoint = read_checkpoint(path / WEIGHTS_FILE)
        layout = "medsegx"
        tokenizer_folder = tokenizer or (path if has_tokenizer_files(path) else None)
    else:
        file = find_published_checkpoint(path) if path.is_dir() else path
        checkpoint = read_checkpoint(file)
        if checkpoint.layout == "encoder_pretrain":
            raise WeightsError(f"checkpoint {file} holds only a pre-trained image encoder (vit_pretrain.ckpt); "
                               f"it cannot segment on its own: use the full SegVol weights (pytorch_model.bin)")
        model_config = config or infer_config(checkpoint.state, str(file))
        layout = checkpoint.layout
        tokenizer_folder = tokenizer or find_tokenizer(file.parent)
    model = build_model(model_config, empty=True)  # every tensor is adopted from the checkpoint just below
    load_state(model, checkpoint.state, str(checkpoint.path), skip_prefixes=model.packaged_state_prefixes())
    model.restore_buffers()
    if layout == "medsegx" and (path / EXPERTS_FILE).is_file():
        load_expert_pack(model, path / EXPERTS_FILE)
    if tokenizer_folder is not None:
        model.set_tokenizer(Path(tokenizer_folder))
    # Where the tensors came from, for records such as 'medsegx weights import'.
    model.weights_source = str(checkpoint.path)
    model.weights_layout = layout
    return model.to(device).eval()


# ---- saving ---------------------------------------------------------------------------------------------
def save_model(model: SegVol, folder: PathLike, source: Optional[Dict] = None, overwrite: bool = False,
               progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
               extra_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``model`` as our folder format. The folder is assembled under a temporary name beside the
    destination and renamed into place, so an interrupted write leaves nothing half-written.

    Attached experts are not part of the base weights; ``extra_files(staging_folder)`` may write more files
    (e.g. the expert pack, ``EXPERTS_FILE``) before the checksums are recorded."""
    def fill(staging: Path) -> None:
        if extra_files is not None:
            extra_files(staging)
        tokenizer_source = getattr(model.text_encoder, "tokenizer_source", None)
        if tokenizer_source and Path(tokenizer_source).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_source) / name).is_file():
                    shutil.copyfile(Path(tokenizer_source) / name, staging / name)

    return write_folder(folder, base_state(model), {"model": model.config.to_dict(), "source": source or {}},
                        overwrite, progress, cancel, fill)


def write_folder(folder: PathLike, state: Dict[str, torch.Tensor], record: Dict, overwrite: bool = False,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                 fill: Optional[Callable[[Path], None]] = None) -> Path:
    """Our folder format for any model: ``state`` as safetensors, ``record`` (plus the format key) as
    config.json, ``fill(staging)`` for further files, then SHA256SUMS. Assembled under a temporary name beside
    the destination and renamed into place, so an interrupted write leaves nothing half-written."""
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    if folder.exists() and not overwrite:
        raise OutputError(f"output folder {folder} already exists; choose another -o or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        report(progress, 0.1, "writing weights")
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(staging / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        check(cancel)
        if fill is not None:
            fill(staging)
        (staging / CONFIG_FILE).write_text(json.dumps({FORMAT_KEY: FORMAT_VERSION, **record}, indent=2),
                                           encoding="utf-8")
        report(progress, 0.8, "recording checksums")
        write_checksums(staging)
        check(cancel)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report(progress, 1.0, "saved")
    return folder


def write_checksums(folder: Path) -> None:
    lines = [f"{sha256_of(p)}  {p.name}\n" for p in sorted(folder.iterdir())
             if p.is_file() and p.name != CHECKSUMS_FILE]
    (folder / CHECKSUMS_FILE).write_text("".join(lines), encoding="utf-8")


def verify_folder(folder: PathLike) -> None:
    """Raise WeightsError if a file of our folder no longer matches its recorded sha256."""
    folder = Path(folder)
    sums = folder / CHECKSUMS_FILE
    if not sums.is_file():
        raise WeightsError(f"weights folder {folder}: no {CHECKSUMS_FILE}; re-create it with 'medsegx weights import'")
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, name = line.split(maxsplit=1)
        target = folder / name.strip()
        if not target.is_file() or sha256_of(target) != digest:
            raise WeightsError(f"weights folder {folder}: {name.strip()} is missing or changed since it was "
                               f"written (sha256 mismatch); re-import the weights")
