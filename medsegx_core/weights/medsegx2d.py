"""MedSegX's 2D checkpoints: the official split pair and merged files, mapped onto ``MedSegX2D``.

Layouts:
* ``split``: the original SAM checkpoint (flat dict, SAM names, 1024-input shapes) + MedSegX's trained file
  (``{'model': {...}}``: adapters, context tables and the whole mask decoder). Loaded as the official code does:
  encoder and prompt encoder from SAM, with ``pos_embed`` and the global blocks' relative-position tables
  bilinearly resized (``align_corners=False``) to the 256 input; SAM's mask decoder ignored; everything in the
  trained file on top.
* ``merged``: one file (``.pth`` flat dict or ``.safetensors``) with the loaded model's keys.
* ``folder``: our folder format (``store.write_folder``: model.safetensors with our key names, config.json with
  ``"kind": "medsegx2d"`` and the architecture, SHA256SUMS), written by ``import_medsegx`` and read by
  ``load_medsegx_weights``, which also takes the two layouts above.
MedSegX wraps each block's MLP, so its merged names are ``blocks.{i}.mlp.mlp.lin*`` where SAM (and our model)
have ``blocks.{i}.mlp.lin*``, and its adapters are ``blocks.{i}.mlp.adapter_*`` with the context tables
``modal_embed`` / ``organ_embed.{0..4}``; those go to our ConMoAE (``image_encoder.conmoae.*``) through
``medsegx_state_to_conmoae``. Files are read with safetensors or ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch.nn import functional as F

from ..errors import OutputError, WeightsError
from ..modeling.conmoae import CONTEXT_TABLES, ConMoAE, ConMoAEConfig
from ..modeling.medsegx2d.config import MedSegX2DConfig
from ..modeling.medsegx2d.model import MedSegX2D
from ..progress import CancelToken, ProgressCallback, report
from .checkpoints import load_state, mask_decoder_config, read_tensors
from .store import (KIND_KEY, MEDSEGX2D_KIND, WEIGHTS_FILE, is_our_weights_folder, read_config_record,
                    sha256_of, verify_folder, write_folder)

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, Path]

SAM_MLP, MEDSEGX_MLP = ".mlp.lin", ".mlp.mlp.lin"
MEDSEGX_EXPERT_KEY = re.compile(r"^image_encoder\.(blocks\.\d+\.mlp\.adapter_|modal_embed\.|organ_embed\.)")
SAM_KEPT_PREFIXES = ("image_encoder.", "prompt_encoder.")   # SAM's mask decoder is replaced by the trained one
MEDSEGX_INPUT_SIZE = 256
SAM_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
REL_POS_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$")


def _flat_state(raw: object, path: Path) -> Tuple[bool, StateDict]:
    """(is MedSegX's trained-only file, its tensors)."""
    if not isinstance(raw, Mapping):
        raise WeightsError(f"checkpoint {path}: holds a {type(raw).__name__}, not a dictionary of tensors")
    trained = isinstance(raw.get("model"), Mapping)
    tensors = raw["model"] if trained else raw
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad or not tensors:
        raise WeightsError(f"checkpoint {path}: {'entry ' + repr(bad[0]) + ' is not a tensor' if bad else 'is empty'}")
    return trained, dict(tensors)


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, G, G, C) -> (1, grid, grid, C), bilinear, align_corners=False, no antialias (as MedSegX loads SAM)."""
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def resize_rel_pos(table: torch.Tensor, rows: int) -> torch.Tensor:
    """(R, C) -> (rows, C): the table as a 1x1xRxC image, bilinear, align_corners=False (linear along rows)."""
    return F.interpolate(table[None, None], size=(rows, table.shape[1]), mode="bilinear",
                         align_corners=False)[0, 0]


def fit_to_config(state: StateDict, config: MedSegX2DConfig) -> StateDict:
    """Resize what MedSegX resizes when it loads SAM's 1024-input encoder at 256: ``pos_embed`` to the token grid
    and the global blocks' relative-position tables to 2*grid-1 rows (windowed tables already fit)."""
    fitted = dict(state)
    pos_embed = fitted.get("image_encoder.pos_embed")
    if pos_embed is not None and pos_embed.shape[1] != config.token_grid:
        fitted["image_encoder.pos_embed"] = resize_pos_embed(pos_embed, config.token_grid)
    for key, table in state.items():
        found = REL_POS_KEY.match(key)
        if found:
            block = int(found.group(1))
            side = config.token_grid if block in config.global_attn_indexes else config.window_size
            if table.shape[0] != 2 * side - 1:
                fitted[key] = resize_rel_pos(table, 2 * side - 1)
    return fitted


def medsegx_state_to_conmoae(state: Mapping[str, torch.Tensor], experts: ConMoAE,
                             prefix: str = "image_encoder.") -> Dict[str, torch.Tensor]:
    """MedSegX's trained keys (``{prefix}blocks.{i}.mlp.adapter_*``, ``modal_embed``, ``organ_embed.{0..4}``) ->
    this module's state dict. Context tables are copied into their first rows (MedSegDB keeps its indices in our
    hierarchy); our extra rows and the unknown rows stay as they are."""
    out = {k: v.clone() for k, v in experts.state_dict().items()}
    for position, index in enumerate(experts.block_indices):
        source = f"{prefix}blocks.{index}.mlp."
        for key in experts.experts[position].state_dict():
            if source + key not in state:
                raise WeightsError(f"MedSegX weights lack {source + key}: they are not a ConMoAE checkpoint for "
                                   f"this backbone (blocks {experts.block_indices})")
            out[f"experts.{position}.{key}"] = state[source + key]
    official = {"modality": f"{prefix}modal_embed.weight"}
    official.update({name: f"{prefix}organ_embed.{i}.weight" for i, name in enumerate(CONTEXT_TABLES[:5])})
    for name, key in official.items():
        table = out[f"context_tables.tables.{name}.weight"]
        rows = state[key]
        if rows.shape[0] > table.shape[0] or rows.shape[1] != table.shape[1]:
            raise WeightsError(f"{key} has shape {tuple(rows.shape)}; our {name} table is {tuple(table.shape)}")
        table[: rows.shape[0]] = rows
    return out


def to_model_state(merged: StateDict, model: MedSegX2D) -> StateDict:
    """MedSegX names -> ours: MLP keys unwrapped, adapters and context tables into our ConMoAE."""
    experts = {k: v for k, v in merged.items() if MEDSEGX_EXPERT_KEY.match(k)}
    if not experts:
        raise WeightsError("these MedSegX weights hold no adapters or context tables (image_encoder.blocks.*.mlp."
                           "adapter_*, modal_embed, organ_embed): give the trained MedSegX file too")
    state = {k.replace(MEDSEGX_MLP, SAM_MLP): v for k, v in merged.items() if k not in experts}
    conmoae = medsegx_state_to_conmoae(experts, model.image_encoder.conmoae, prefix="image_encoder.")
    state.update({f"image_encoder.conmoae.{k}": v for k, v in conmoae.items()})
    return state


def read_medsegx_state(path: PathLike, trained: Optional[PathLike] = None) -> Tuple[str, StateDict]:
    """(layout, state with MedSegX's merged names, not yet resized) from one merged file, or from SAM's
    checkpoint + MedSegX's trained file (encoder and prompt encoder from SAM, everything trained on top)."""
    path = Path(path)
    is_trained, state = _flat_state(read_tensors(path), path)
    if trained is None:
        if is_trained:
            raise WeightsError(f"{path} is MedSegX's trained-only file ({{'model': ...}}): give the SAM checkpoint "
                               f"as the weights and this file as the trained ones ('medsegx weights import "
                               f"SAM_CHECKPOINT --trained {path.name}')")
        if not any(MEDSEGX_EXPERT_KEY.match(k) for k in state):
            raise WeightsError(f"{path} has no MedSegX experts (a SAM checkpoint?): give MedSegX's trained file "
                               f"with it ('medsegx weights import {path.name} --trained medsegx_vit_b.pth')")
        return "merged", state
    trained_path = Path(trained)
    trained_is_trained, trained_state = _flat_state(read_tensors(trained_path), trained_path)
    if is_trained or not trained_is_trained:
        raise WeightsError(f"split MedSegX weights are a SAM checkpoint plus MedSegX's trained file "
                           f"({{'model': ...}}); {path} and {trained_path} are not that pair")
    merged = {k.replace(SAM_MLP, MEDSEGX_MLP): v for k, v in state.items() if k.startswith(SAM_KEPT_PREFIXES)}
    merged.update(trained_state)
    return "split", merged


def _shape(state: StateDict, key: str) -> Tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"MedSegX weights lack {key}: not a MedSegX (SAM ViT) checkpoint")
    return tuple(state[key].shape)


def _indices(state: StateDict, pattern: str) -> list:
    return sorted({int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m})


def infer_config(state: StateDict, decoder_heads: int = 8, image_size: Optional[int] = None) -> MedSegX2DConfig:
    """The architecture from tensor shapes (MedSegX names). Not recorded in any shape: the decoder's head count
    (SAM uses 8), the experts' scale (0.1); the input size defaults to the checkpoint's pos_embed grid."""
    embed_dim, _, patch, _ = _shape(state, "image_encoder.patch_embed.proj.weight")
    stored_grid = _shape(state, "image_encoder.pos_embed")[1]
    depth = len(_indices(state, r"image_encoder\.blocks\.(\d+)\.norm1\.weight"))
    rows = {i: _shape(state, f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)}
    global_blocks = tuple(i for i in range(depth) if rows[i][0] == 2 * stored_grid - 1)
    windowed_rows = {rows[i][0] for i in range(depth) if i not in global_blocks}
    dim = _shape(state, "image_encoder.neck.0.weight")[0]
    expert_blocks = _indices(state, r"image_encoder\.blocks\.(\d+)\.mlp\.adapter_gate\.weight")
    if not expert_blocks:
        raise WeightsError("MedSegX weights hold no adapters (image_encoder.blocks.*.mlp.adapter_*)")
    first = f"image_encoder.blocks.{expert_blocks[0]}.mlp."
    experts = ConMoAEConfig(
        n_experts=len(_indices(state, re.escape(first) + r"adapter_down\.(\d+)\.weight")),
        bottleneck=_shape(state, first + "adapter_down.0.weight")[0],
        context_dim=_shape(state, first + "adapter_input_embed.weight")[0],
        blocks=expert_blocks)
    return MedSegX2DConfig(
        image_size=image_size or stored_grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
        num_heads=embed_dim // rows[0][1], mlp_dim=_shape(state, f"image_encoder.blocks.0{MEDSEGX_MLP}1.weight")[0],
        global_attn_indexes=global_blocks,
        window_size=(windowed_rows.pop() + 1) // 2 if len(windowed_rows) == 1 else 14,
        out_chans=dim,
        mask_decoder=mask_decoder_config(state, decoder_heads, lambda key: _shape(state, key)),
        mask_in_chans=_shape(state, "prompt_encoder.mask_downscaling.3.weight")[0],
        conmoae=experts)


def load_medsegx(path: PathLike, trained: Optional[PathLike] = None, config: Optional[MedSegX2DConfig] = None,
                 decoder_heads: int = 8) -> MedSegX2D:
    """A MedSegX model in eval mode from a merged file, or from (SAM checkpoint, trained file).

    The architecture is read from the tensor shapes unless ``config`` is given (the decoder's head count is not in
    any shape: ``decoder_heads``). The split pair is loaded at MedSegX's 256 input. ``model.checkpoint_layout``
    says which layout was read."""
    layout, state = read_medsegx_state(path, trained)
    config = config or infer_config(state, decoder_heads, MEDSEGX_INPUT_SIZE if layout == "split" else None)
    model = MedSegX2D(config)
    source = str(path) if trained is None else f"{path} + {trained}"
    load_state(model, to_model_state(fit_to_config(state, config), model), source)
    model.checkpoint_layout = layout
    return model.eval()


# ---- our folder format -------------------------------------------------------------------------------------------
def is_medsegx2d_checkpoint(path: PathLike, trained: Optional[PathLike] = None) -> bool:
    """Whether ``path`` (with ``trained``) is MedSegX 2D weights in any layout: our folder of that kind, a merged
    file with MedSegX's adapters, MedSegX's trained-only file, or a SAM checkpoint given with a trained file."""
    path = Path(path).expanduser()
    if trained is not None:
        return True
    if path.is_dir():
        return is_our_weights_folder(path) and read_config_record(path).get(KIND_KEY) == MEDSEGX2D_KIND
    if path.name == WEIGHTS_FILE and is_our_weights_folder(path.parent):
        return is_medsegx2d_checkpoint(path.parent)
    if path.suffix == ".safetensors":
        tensors = dict.fromkeys(_safetensors_keys(path))      # the names only: a large file is not read
    else:
        raw = read_tensors(path)                               # torch files are memory-mapped
        tensors = raw.get("model") if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping) else raw
    # MedSegX's adapters, or SAM's ViT (alone it is refused with a note that the trained file is missing)
    return isinstance(tensors, Mapping) and any(
        isinstance(k, str) and (MEDSEGX_EXPERT_KEY.match(k) or k == SAM_PATCH_KEY) for k in tensors)


def _safetensors_keys(path: Path) -> list:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception:  # noqa: BLE001 - read_tensors gives the one-line reason
        read_tensors(path)
        raise


def load_medsegx_weights(path: PathLike, trained: Optional[PathLike] = None, decoder_heads: int = 8,
                         verify: bool = False) -> MedSegX2D:
    """MedSegX's 2D model from our folder (or its model.safetensors), a merged file, or the split pair
    (``path`` = SAM checkpoint, ``trained`` = MedSegX's trained file). ``model.weights_record`` says what was
    read (layout, file, sha256) for the folder's config.json."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"weights {path}: no such file or folder; give a MedSegX checkpoint or a folder made by "
                           f"'medsegx weights import'")
    folder = path.parent if path.name == WEIGHTS_FILE and is_our_weights_folder(path.parent) else path
    if folder.is_dir():
        if not is_our_weights_folder(folder):
            raise WeightsError(f"weights {folder}: not a folder made by 'medsegx weights import' (no config.json + "
                               f"{WEIGHTS_FILE}); give the MedSegX checkpoint files themselves")
        record = read_config_record(folder)
        if record.get(KIND_KEY) != MEDSEGX2D_KIND:
            raise WeightsError(f"weights {folder}: a volumetric SegVol model, not MedSegX's 2D slice model; slice "
                               f"mode needs MedSegX weights ('medsegx weights import SAM_CHECKPOINT --trained "
                               f"medsegx_vit_b.pth')")
        if verify:
            verify_folder(folder)
        model = MedSegX2D(MedSegX2DConfig.from_dict(record["model"]))
        load_state(model, read_tensors(folder / WEIGHTS_FILE), str(folder / WEIGHTS_FILE))
        model.checkpoint_layout = "folder"
        model.weights_record = dict(record.get("source") or {})
        model.weights_folder = folder
        return model.eval()
    model = load_medsegx(path, trained, decoder_heads=decoder_heads)
    files = [path] + ([Path(trained)] if trained is not None else [])
    model.weights_record = {"layout": model.checkpoint_layout, "decoder_heads": decoder_heads,
                            "files": [{"path": str(f.resolve()), "sha256": sha256_of(f),
                                       "size_bytes": f.stat().st_size} for f in files]}
    return model


def import_medsegx(path: PathLike, output: PathLike, trained: Optional[PathLike] = None, decoder_heads: int = 8,
                   overwrite: bool = False, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> Path:
    """Convert MedSegX 2D weights (any layout ``load_medsegx_weights`` reads) into our folder format at
    ``output``: our key names in safetensors, the architecture and the source files' sha256 in config.json."""
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise OutputError(f"output folder {output} already exists; choose another -o or pass --overwrite")
    report(progress, 0.0, "reading the MedSegX weights")
    model = load_medsegx_weights(path, trained, decoder_heads)
    record = {KIND_KEY: MEDSEGX2D_KIND, "model": model.config.to_dict(), "source": model.weights_record}
    return write_folder(output, model.state_dict(), record, overwrite, progress, cancel)


def describe_folder(folder: PathLike) -> str:
    """One line for listings: what the MedSegX folder holds."""
    record = read_config_record(folder)
    config = record.get("model", {})
    return (f"MedSegX 2D (slice mode, box prompts), ViT width {config.get('embed_dim', '?')} x "
            f"{config.get('depth', '?')} blocks, {config.get('image_size', '?')} px input")
