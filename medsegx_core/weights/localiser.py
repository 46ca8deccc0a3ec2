"""The text localiser's weights: our folder format (``store.write_folder``), bundled in the package.

``resources/localiser/`` holds the localiser trained by ``python -m medsegx_core.training.localiser_cli`` with the
recipe ``resources/recipes/text_localiser.json`` (model card beside the weights). The folder's SHA256SUMS is
checked before every load: a replaced or damaged file is refused with one line.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Union

from ..errors import WeightsError
from ..modeling.slice_localiser import SliceLocaliser, SliceLocaliserConfig
from .store import CONFIG_FILE, KIND_KEY, WEIGHTS_FILE, read_config_record, verify_folder, write_folder

LOCALISER_KIND = "slice_localiser"
PathLike = Union[str, Path]


def bundled_localiser_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "resources" / "localiser"


def save_localiser(folder: PathLike, localiser: SliceLocaliser, record: Dict, overwrite: bool = False) -> Path:
    """``record``: the recipe, the data (cases, hash) and anything else the model card cites."""
    return write_folder(folder, localiser.state_dict(),
                        {KIND_KEY: LOCALISER_KIND, "model": localiser.config.to_dict(), **record}, overwrite)


def load_localiser(folder: Optional[PathLike] = None) -> SliceLocaliser:
    """The localiser of ``folder`` (default: the bundled one), checked against its SHA256SUMS, in eval mode."""
    folder = Path(folder) if folder is not None else bundled_localiser_dir()
    return _load(str(folder.resolve()), *_stamp(folder))


def _stamp(folder: Path):
    """What makes a cached load stale: the files' sizes and modification times."""
    files = [folder / WEIGHTS_FILE, folder / CONFIG_FILE]
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in files)


@lru_cache(maxsize=2)
def _load(folder_text: str, *_stamp) -> SliceLocaliser:
    from safetensors.torch import load_file

    folder = Path(folder_text)
    if not (folder / WEIGHTS_FILE).is_file():
        raise WeightsError(f"text localiser {folder}: no {WEIGHTS_FILE}; reinstall medsegx-core (it ships the "
                           f"localiser) or train one with 'python -m medsegx_core.training.localiser_cli'")
    verify_folder(folder)
    record = read_config_record(folder)
    if record.get(KIND_KEY) != LOCALISER_KIND:
        raise WeightsError(f"{folder}: not a text localiser (its config.json names {record.get(KIND_KEY)!r})")
    localiser = SliceLocaliser(SliceLocaliserConfig.from_dict(record["model"]))
    state = load_file(str(folder / WEIGHTS_FILE))
    missing, unexpected = localiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"text localiser {folder}: its weights do not fit its config.json "
                           f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    localiser.eval()
    for parameter in localiser.parameters():
        parameter.requires_grad_(False)
    return localiser


def localiser_structures(folder: Optional[PathLike] = None) -> tuple:
    """The structures a localiser finds, read from its config.json alone (no weights loaded)."""
    return tuple(localiser_record(folder)["model"]["structures"])


def unknown_texts(texts, folder: Optional[PathLike] = None) -> list:
    """The texts a localiser cannot find (not a structure of it, nor a parent of some): empty when it finds all.
    The rule the command line's and the Slicer module's model choices share."""
    from ..data.hierarchy import resolve_term
    from ..inference.text_localisation import channels_for

    structures = localiser_structures(folder)
    return [text for text in texts if not channels_for(structures, resolve_term(text))]


def localiser_record(folder: Optional[PathLike] = None) -> Dict:
    return read_config_record(Path(folder) if folder is not None else bundled_localiser_dir())


__all__ = ["load_localiser", "save_localiser", "bundled_localiser_dir", "LOCALISER_KIND", "localiser_record",
           "localiser_structures", "unknown_texts"]
