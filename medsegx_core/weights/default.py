"""Which weights to use when the user names none, and a one-line explanation to show them.

Order, first match wins:

1. ``$MEDSEGX_WEIGHTS`` (a file or folder the user set on purpose; an invalid path is an error, not skipped);
2. official weights installed in the cache: ``$MEDSEGX_HOME/weights/segvol`` (``~/.medsegx`` by default), where
   ``medsegx weights import``/``download`` and Slicer's "Import official checkpoint" put them; then any other
   folder of our format under ``$MEDSEGX_HOME/weights`` that is not a starter model;
3. the starter model bundled in the package (``medsegx_core/resources/starter``), small and trained on a
   handful of real volumes: good enough for a first segmentation of large organs, not for clinical work.

The CLI prints ``DefaultWeights.explanation`` on stderr and the Slicer module shows it in its status line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import WeightsError
from .hub import weights_dir
from .store import SEGVOL_KIND, is_our_weights_folder, read_config_record, weights_kind

WEIGHTS_ENV = "MEDSEGX_WEIGHTS"
OFFICIAL_NAME = "segvol"
STARTER_NAME = "starter"
STARTER_DIR = Path(__file__).resolve().parents[1] / "resources" / "starter"


@dataclass(frozen=True)
class DefaultWeights:
    path: Path            # give it to ``weights.store.load_model``
    kind: str             # "environment", "official", "installed" or "starter"
    explanation: str      # one line for the user

    @property
    def is_starter(self) -> bool:
        return self.kind == "starter"


def starter_weights_dir() -> Path:
    """The bundled starter model's folder (model.safetensors, config.json, SHA256SUMS, MODEL_CARD.md)."""
    return STARTER_DIR


def _is_starter(folder: Path) -> bool:
    try:
        return read_config_record(folder).get("model", {}).get("name") == STARTER_NAME
    except (OSError, ValueError):
        return False


def _installed(home_weights: Path) -> Optional[DefaultWeights]:
    official = home_weights / OFFICIAL_NAME
    if official.is_dir() and (is_our_weights_folder(official) or any(official.iterdir())):
        return DefaultWeights(official, "official", f"using the official weights installed in {official}")
    if home_weights.is_dir():
        for folder in sorted(p for p in home_weights.iterdir() if p.is_dir()):
            if is_our_weights_folder(folder) and not _is_starter(folder) and weights_kind(folder) == SEGVOL_KIND:
                return DefaultWeights(folder, "installed", f"using the weights installed in {folder} (no "
                                                           f"official weights in {official})")
    return None


def default_weights() -> DefaultWeights:
    """The weights to use when none were given (see the module docstring for the order)."""
    chosen = os.environ.get(WEIGHTS_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.exists():
            raise WeightsError(f"{WEIGHTS_ENV}={chosen}: no such file or folder; point it at weights (a checkpoint "
                               f"or a folder from 'medsegx weights import') or unset it")
        return DefaultWeights(path, "environment", f"using the weights in {path} (from ${WEIGHTS_ENV})")
    installed = _installed(weights_dir())
    if installed is not None:
        return installed
    starter = starter_weights_dir()
    if not is_our_weights_folder(starter):
        raise WeightsError(f"no weights given, none installed in {weights_dir()} and the bundled starter model "
                           f"is missing from {starter} (a broken install?); pass --weights, or run 'medsegx "
                           f"weights download segvol'")
    return DefaultWeights(starter, "starter",
                          f"using the bundled starter model ({starter}) because no official weights are "
                          f"installed; it is small and trained on a few volumes (see its MODEL_CARD.md): for "
                          f"better results run 'medsegx weights download segvol' or 'medsegx weights import FILE'")
