"""Expert packs: the tensors a fine-tune trained, in one safetensors file that loads on top of its base model.

Contents: the trained tensors only (ConMoAE experts and context tables, plus the mask decoder when it was
trained), and in the safetensors metadata: the ConMoAE config, the hierarchy version, the sha256 of the base
model's weights, and the structures trained. Loading checks the base (a pack on another base would combine
adapters with weights they were not trained against) and the hierarchy version (its table rows must mean the
same structures). Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..data.atomic import atomic_output
from ..data.hierarchy import load_hierarchy
from ..errors import WeightsError
from ..modeling.conmoae import ConMoAE, ConMoAEConfig, attach_experts_to_model

PACK_FORMAT = "medsegx-expert-pack"
PACK_VERSION = "1"
EXPERT_STATE_PREFIX = "conmoae."   # attached experts' state-dict keys (model.conmoae): never base weights
# Packs shipped with the engine, named by their file's stem ("abdominal_mr"): the bundled starter model's (SegVol)
# in the folder itself, LiteMedSAM's in its subfolder. Two bases may ship a pack of the same name (a domain adapted
# on each model); a name alone then means LiteMedSAM's, the model boxes and known texts run by default.
BUNDLED_PACKS_DIR = Path(__file__).resolve().parents[1] / "resources" / "expert_packs"
BUNDLED_BASES = (("", "SegVol"), ("litemedsam", "LiteMedSAM"))   # (subfolder, model class); the last is preferred


@dataclass(frozen=True)
class BundledPack:
    name: str
    base_model: str          # the model class it was fine-tuned on (pack_base_model)
    path: Path


def bundled_pack_list() -> List[BundledPack]:
    """Every expert pack shipped with the engine, SegVol's first."""
    return [BundledPack(path.stem, base, path) for folder, base in BUNDLED_BASES
            for path in sorted((BUNDLED_PACKS_DIR / folder).glob("*.safetensors"))]


def bundled_packs(base_model: Optional[str] = None) -> Dict[str, Path]:
    """name -> file of the expert packs shipped for ``base_model`` ("SegVol", "LiteMedSAM"); every base's when
    None, a name two bases share giving LiteMedSAM's."""
    return {pack.name: pack.path for pack in bundled_pack_list() if base_model in (None, pack.base_model)}


def find_expert_pack(name_or_path: Union[str, Path], base_model: Optional[str] = None) -> Path:
    """An expert pack given as a file, or by the name of a bundled pack (``medsegx segment --experts
    abdominal_mr``) for ``base_model`` (the model it will load on; None: LiteMedSAM's when two bases have one)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packs = bundled_packs(base_model)
    if str(name_or_path) in packs:
        return packs[str(name_or_path)]
    names = sorted(bundled_packs())
    raise WeightsError(f"expert pack {name_or_path}: no such file, and no bundled pack of that name"
                       f"{f' for {base_model}' if base_model else ''} (bundled: {', '.join(names) or 'none'}); give "
                       f"the .safetensors file 'medsegx finetune' wrote")


def pack_choice_for(choice: Union[str, Path, None], base_model: str) -> Optional[str]:
    """A user's expert-pack choice as a ``base_model`` model takes it: the choice itself when it is empty or "none",
    the pack's file when the choice names one fine-tuned on ``base_model``, else None (the pack goes with another
    model). The batch script gives each of its two models its part of one ``--experts``."""
    text = "" if choice is None else str(choice).strip()
    if not text or text.lower() == "none":
        return text or None
    try:
        path = find_expert_pack(text, base_model)
    except WeightsError:
        return None
    return str(path) if pack_base_model(read_pack_metadata(path)) == base_model else None


def apply_expert_pack(model: nn.Module, choice: Union[str, Path, None], replace_experts: bool = False
                      ) -> Optional[Dict]:
    """A user's expert-pack choice on a freshly loaded base ``model``, the one rule of ``medsegx segment
    --experts``, the Slicer batch script and the Slicer module: None (or "") keeps the weights' own experts, if
    any; "none" (any case) leaves them out (detached: the backbone computes exactly what it did without them);
    anything else names a pack (a file, or a bundled pack's name: ``find_expert_pack``) loaded on top
    (``load_expert_pack``: WeightsError on another base or hierarchy). Returns the loaded pack's metadata, else
    None."""
    text = "" if choice is None else str(choice).strip()
    if not text:
        return None
    if text.lower() == "none":
        experts = getattr(model, "conmoae", None)
        if experts is not None:
            experts.detach()
            del model.conmoae
        return None
    return load_expert_pack(model, find_expert_pack(text, type(model).__name__), replace_experts=replace_experts)


def base_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The base model's own tensors: everything but attached experts and weights that come from an installed
    package (``packaged_state_prefixes``, e.g. the MiniLM tower), i.e. what the weights file stores."""
    packaged = tuple(model.packaged_state_prefixes()) if hasattr(model, "packaged_state_prefixes") else ()
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(EXPERT_STATE_PREFIX) and not (packaged and k.startswith(packaged))}


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of tensor names, dtypes, shapes and bytes: equal for equal weights in any file layout."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def save_expert_pack(path: Union[str, Path], model: nn.Module, trained_prefixes: Sequence[str], base_sha256: str,
                     structures: Sequence[Mapping] = (), extra: Optional[Mapping] = None,
                     overwrite: bool = False) -> Path:
    """Write the tensors under ``trained_prefixes`` (e.g. ``("conmoae.", "mask_decoder.")``) atomically."""
    from safetensors.torch import save_file

    experts = getattr(model, "conmoae", None)
    if not isinstance(experts, ConMoAE):
        raise WeightsError("the model has no experts attached (model.conmoae); nothing to save")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k.startswith(tuple(trained_prefixes))}
    metadata = {
        "format": PACK_FORMAT, "pack_version": PACK_VERSION,
        "conmoae": json.dumps(experts.config.to_dict()),
        "hierarchy_version": experts.config.hierarchy_version,
        "base_sha256": base_sha256,
        "base_model": type(model).__name__,
        "trained_prefixes": json.dumps(list(trained_prefixes)),
        "structures": json.dumps(list(structures)),
        "extra": json.dumps(dict(extra or {})),
    }
    with atomic_output(path, overwrite=overwrite) as temp:
        save_file(state, str(temp), metadata=metadata)
    return Path(path)


def read_pack_metadata(path: Union[str, Path]) -> Dict[str, object]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"expert pack {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:   # safetensors raises its own error types for non-safetensors files
        raise WeightsError(f"expert pack {path}: not a safetensors file ({exc})") from None
    if metadata.get("format") != PACK_FORMAT:
        raise WeightsError(f"{path}: not a MedSegX expert pack (no '{PACK_FORMAT}' metadata); make one with "
                           f"'medsegx finetune'")
    decoded: Dict[str, object] = dict(metadata)
    for key in ("conmoae", "trained_prefixes", "structures", "extra"):
        decoded[key] = json.loads(metadata[key])
    return decoded


def load_expert_pack(model: nn.Module, path: Union[str, Path], base_sha256: Optional[str] = None,
                     replace_experts: bool = False) -> Dict:
    """Attach the pack's experts to ``model`` (a base model) and load its tensors; returns its metadata. Volumes of
    other modalities than the pack's get the model's own experts back (``use_pack_for``).

    Raises WeightsError when the model is not the pack's base, the hierarchy version differs, or the model already
    has experts of another configuration (``replace_experts``: drop those instead)."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_pack_metadata(path)
    hierarchy = load_hierarchy()
    if metadata["hierarchy_version"] != hierarchy.version:
        raise WeightsError(f"expert pack {path} was trained with anatomy hierarchy {metadata['hierarchy_version']}"
                           f", this installation has {hierarchy.version}: fine-tune it again with this version")
    actual = base_sha256 or weights_sha256(base_state(model))
    if actual != metadata["base_sha256"]:
        raise WeightsError(f"expert pack {path} was trained on other base weights (sha256 "
                           f"{str(metadata['base_sha256'])[:12]}..., this model {actual[:12]}...): load it on the "
                           f"model it was fine-tuned from")
    experts = getattr(model, "conmoae", None)
    if experts is not None and experts.config.to_dict() != metadata["conmoae"]:
        if not replace_experts:
            raise WeightsError(f"expert pack {path}: the model already has experts with another configuration")
        experts.detach()     # the model's own experts go: volumes outside the pack's domain get none
        del model.conmoae
        experts = None
    if experts is None:
        experts = attach_experts_to_model(model, ConMoAEConfig.from_dict(metadata["conmoae"]))
    state = load_file(str(path))
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k.startswith(EXPERT_STATE_PREFIX) and k not in state]
    if unexpected or mismatched or missing:
        problems = unexpected[:3] + mismatched[:3] + missing[:3]
        raise WeightsError(f"expert pack {path} does not fit this model ({', '.join(problems)}): it was made for "
                           f"another architecture")
    without = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in state}
    model.load_state_dict(state, strict=False)
    model.pack_domain = PackDomain(path.name.split(".")[0], pack_modalities(metadata), state, without)
    return metadata


@dataclass
class PackDomain:
    """What a loaded pack was fine-tuned on and what it replaced. The experts (and a pack's decoder) are shared by
    every domain, so a pack fine-tuned on MR changes CT results too (the bundled abdominal MR pack lowers CT Dice):
    ``use_pack_for`` applies a pack to volumes of its own modalities only."""

    name: str
    modalities: List[str]                 # empty: no recorded domain (applies everywhere)
    pack: Dict[str, torch.Tensor]         # the pack's tensors, by model key
    without: Dict[str, torch.Tensor]      # what those keys held before the pack (the model's own experts)

    def covers(self, modality) -> bool:
        return not self.modalities or not modality.known or modality.name in self.modalities


def use_pack_for(model: nn.Module, modality) -> Optional[str]:
    """Put the loaded pack's tensors in place for a volume of ``modality`` (a hierarchy Modality) when the pack
    covers it (or the modality is unknown), and the model's own otherwise; then a note saying the pack was left
    out. Call before encoding anything of the volume (``Predictor.set_volume`` does)."""
    domain: Optional[PackDomain] = getattr(model, "pack_domain", None)
    if domain is None:
        return None
    inside = domain.covers(modality)
    model.load_state_dict(domain.pack if inside else domain.without, strict=False)
    if inside:
        return None
    return (f"expert pack {domain.name!r} is for {'/'.join(domain.modalities)} volumes: this {modality.name} volume "
            f"is segmented without it (with the model's own experts)")


def pack_base_model(metadata: Mapping[str, object]) -> str:
    """The class of model a pack was fine-tuned on ("SegVol", "LiteMedSAM"): recorded since LiteMedSAM packs
    exist; an older pack is SegVol's."""
    return str(metadata.get("base_model") or "SegVol")


def chosen_pack_base_model(choice: Union[str, Path, None]) -> Optional[str]:
    """The model class an expert-pack choice (as ``apply_expert_pack`` takes it) was fine-tuned on ("LiteMedSAM",
    "SegVol"), or None when the choice names no pack (empty, or "none"). Reads the file's header only."""
    text = "" if choice is None else str(choice).strip()
    if not text or text.lower() == "none":
        return None
    return pack_base_model(read_pack_metadata(find_expert_pack(text)))


def pack_modalities(metadata: Mapping[str, object]) -> list:
    """The modalities a pack's structures were fine-tuned on (the modality row of each recorded context; none for
    a pack that records no contexts, such as a base model's own experts)."""
    modalities = load_hierarchy().modalities
    rows = {structure["context"][-1] for structure in metadata.get("structures", []) if structure.get("context")}
    return sorted(m.name for m in modalities if m.index in rows and m.known)
