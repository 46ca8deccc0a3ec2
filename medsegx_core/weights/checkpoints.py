"""Reading published SegVol checkpoints safely and mapping their keys onto our model.

Layouts understood (all verified against the parity fixture):
* ``hf``: Hugging Face ``BAAI/SegVol`` ``pytorch_model.bin``, a flat dict with every key prefixed ``model.``;
* ``github``: GitHub ``SegVol_v1.pth``, ``{'model': {'module.' + key: ...}, 'epoch': ...}`` (DataParallel);
* ``plain``: safetensors (or a torch file) with our keys and no prefix;
* ``encoder_pretrain``: ``vit_pretrain.ckpt``, ``{'state_dict': {'model.encoder.' + key: ...}}``, encoder only.
The text tower keys use transformers-4.18 names (``clip_text_model.text_model.*`` and a ``position_ids``
buffer); they are mapped to the current names. Torch files are opened with ``weights_only=True`` (and memory
mapped, so a 724 MB file is not copied); anything that needs arbitrary unpickling is refused.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import WeightsError
from ..modeling.config import (ImageEncoderConfig, MaskDecoderConfig, PromptEncoderConfig, SegVolConfig,
                               TextEncoderConfig, preset)

StateDict = Dict[str, torch.Tensor]

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
OLD_CLIP_PREFIX = "text_encoder.clip_text_model.text_model."
NEW_CLIP_PREFIX = "text_encoder.clip_text_model."
ENCODER_PRETRAIN_PREFIX = "model.encoder."


@dataclass
class Checkpoint:
    path: Path
    layout: str              # "hf" | "github" | "plain" | "encoder_pretrain"
    state: StateDict         # our key names


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def read_tensors(path: Union[str, Path]) -> object:
    """The raw content of a checkpoint file: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"checkpoint {path}: not a valid safetensors file ({one_line(exc)})") from exc
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        problem = _not_a_torch_file(path)
        if problem:
            raise WeightsError(f"checkpoint {path}: {problem}; give a SegVol checkpoint (.bin, .pth, .pt, .ckpt), a "
                               f"safetensors file, or a folder made by 'medsegx weights import'")
    try:
        with warnings.catch_warnings():   # torch's notes on pickle protocols are not for users
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise WeightsError(
            f"checkpoint {path} needs arbitrary code to be unpickled{what}; refusing to load it because that "
            f"could run code. Use a safetensors file or a plain tensor checkpoint from a trusted source") from None
    except Exception as exc:  # the unpickler fails in many ways on files that are not checkpoints
        raise WeightsError(f"checkpoint {path}: not a readable PyTorch checkpoint "
                           f"({type(exc).__name__}: {one_line(exc)})") from exc


# torch.save's legacy (non-zip) format starts with a pickled magic number: protocol 2, LONG1 of 10 bytes.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _not_a_torch_file(path: Path) -> Optional[str]:
    """What a file that is neither a zip nor a legacy torch file is, so that nothing else is ever unpickled."""
    with open(path, "rb") as stream:
        head = stream.read(352)
    if not head:
        return "an empty file"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return None
    if head[:4] == b"PK\x03\x04":
        return "a truncated or damaged PyTorch checkpoint (an incomplete zip archive); download or copy it again"
    if head[:2] == b"\x1f\x8b":
        return "gzip-compressed data (a .nii.gz image?), not a checkpoint"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c"):
        return "a NIfTI image, not a checkpoint"
    if head[128:132] == b"DICM":
        return "a DICOM file, not a checkpoint"
    if head[:1] == b"\x80":
        return ("a plain Python pickle, not a PyTorch checkpoint; refusing to unpickle it, since that could run "
                "code")
    return "not a readable PyTorch checkpoint or safetensors file (unrecognised content)"


def unwrap(raw: object, path: Path) -> Tuple[str, StateDict]:
    """Find the tensors inside a published container and strip its prefixes -> (layout, our-keyed tensors)."""
    if not isinstance(raw, Mapping):
        raise WeightsError(f"checkpoint {path}: holds a {type(raw).__name__}, not a dictionary of tensors")
    if isinstance(raw.get("model"), Mapping):
        layout, tensors, prefix = "github", raw["model"], "module."
    elif isinstance(raw.get("state_dict"), Mapping):
        layout, tensors, prefix = "encoder_pretrain", raw["state_dict"], ENCODER_PRETRAIN_PREFIX
    else:
        tensors = raw
        layout, prefix = ("hf", "model.") if tensors and all(k.startswith("model.") for k in tensors) \
            else ("plain", "")
    state: StateDict = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"checkpoint {path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if layout == "encoder_pretrain":
            if not key.startswith(prefix):
                continue  # the pre-training decoder/projection heads are not part of SegVol
            key = "image_encoder." + key[len(prefix):]
        elif prefix and key.startswith(prefix):
            key = key[len(prefix):]
        state[key] = value
    if not state:
        raise WeightsError(f"checkpoint {path}: contains no tensors")
    return layout, map_legacy_names(state)


def map_legacy_names(state: StateDict) -> StateDict:
    """transformers-4.18 CLIP names -> current ones; drop buffers/parameters that current code never uses."""
    mapped: StateDict = {}
    for key, value in state.items():
        if key.startswith(OLD_CLIP_PREFIX):
            key = NEW_CLIP_PREFIX + key[len(OLD_CLIP_PREFIX):]
        if key.startswith(NEW_CLIP_PREFIX) and key.endswith("embeddings.position_ids"):
            continue  # a constant arange buffer, not persistent in transformers >= 4.31
        if key.startswith("image_encoder.blocks.") and ".norm_cross_attn." in key:
            continue  # created (unused) by MONAI >= 1.0, dropped from our blocks
        mapped[key] = value
    return mapped


def read_checkpoint(path: Union[str, Path]) -> Checkpoint:
    path = Path(path)
    layout, state = unwrap(read_tensors(path), path)
    return Checkpoint(path, layout, state)


# ---- loading into a model ---------------------------------------------------------------------------------
def _listing(names: List[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_state(model: nn.Module, state: StateDict, source: str, prefix: str = "",
               skip_prefixes: Iterable[str] = ()) -> None:
    """Load ``state`` into ``model`` (or into its sub-module at ``prefix``) without extra copies.

    Every model tensor must be present with the right shape and nothing may be left over; otherwise a
    WeightsError lists what is missing, unexpected and mis-shaped. Keys under ``skip_prefixes`` (weights that
    come from an installed package) are neither required nor accepted."""
    skip = tuple(skip_prefixes)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()
                if k.startswith(prefix) and not k.startswith(skip)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                         for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        problems = []
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} with other shapes (checkpoint vs model): {_listing(wrong_shape)}")
        if missing:
            problems.append(f"{len(missing)} missing: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise WeightsError(f"weights {source} do not match the model {name!r}: " + "; ".join(problems)
                           + ". Use weights made for this architecture and size")
    # Match dtypes to the model's so that assign=True keeps the model's precision, then adopt the tensors
    # (memory-mapped for torch files) instead of copying them into freshly initialised ones.
    ready = {k: (v.to(expected[k].dtype) if v.dtype != expected[k].dtype else v) for k, v in state.items()}
    model.load_state_dict(ready, strict=False, assign=True)


# ---- configuration from tensor shapes ---------------------------------------------------------------------
def _count(state: StateDict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _known_heads() -> Dict[str, Dict[int, int]]:
    """Head counts are not visible in tensor shapes: take them from the presets with the same widths."""
    heads: Dict[str, Dict[int, int]] = {"vit": {}, "decoder": {}, "clip": {}}
    for name in ("segvol", "tiny"):
        config = preset(name)
        heads["vit"][config.embed_dim] = config.image_encoder.num_heads
        heads["decoder"][config.embed_dim] = config.mask_decoder.transformer_heads
        clip = config.text_encoder.clip
        heads["clip"][clip["hidden_size"]] = clip["num_attention_heads"]
    return heads


def mask_decoder_config(state: StateDict, heads: int, shape: Callable[[str], Tuple[int, ...]],
                        prefix: str = "mask_decoder.") -> MaskDecoderConfig:
    """A SAM-style mask decoder's configuration (SegVol's and MedSegX's) from its tensor shapes; the head count
    is in no shape. ``shape(key)`` raises the caller's WeightsError for a missing key."""
    width = shape(prefix + "iou_token.weight")[1]
    iou_head = prefix + "iou_prediction_head.layers."
    return MaskDecoderConfig(
        transformer_depth=_count(state, re.escape(prefix) + r"transformer\.layers\.(\d+)\."),
        transformer_heads=heads,
        transformer_mlp_dim=shape(prefix + "transformer.layers.0.mlp.lin1.weight")[0],
        attention_downsample_rate=width // shape(
            prefix + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0],
        num_multimask_outputs=shape(prefix + "mask_tokens.weight")[0] - 1,
        iou_head_depth=_count(state, re.escape(iou_head) + r"(\d+)\."),
        iou_head_hidden_dim=shape(iou_head + "0.weight")[0],
    )


def infer_config(state: StateDict, source: str, name: Optional[str] = None) -> SegVolConfig:
    """The SegVolConfig of a full published checkpoint, read from its tensor shapes."""
    def shape(key: str) -> Tuple[int, ...]:
        if key not in state:
            raise WeightsError(f"checkpoint {source}: has no {key!r}; it is not a complete SegVol checkpoint "
                               f"(give a config.json with --config)")
        return tuple(state[key].shape)

    _, tokens, width = shape("image_encoder.patch_embedding.position_embeddings")
    patch_values = shape("image_encoder.patch_embedding.patch_embeddings.1.weight")[1]
    if (tokens, patch_values) != (2048, 1024):
        raise WeightsError(f"checkpoint {source}: {tokens} image tokens of {patch_values} values is not SegVol's "
                           f"32x256x256 / 4x16x16 layout; give its config.json with --config")
    clip_width = shape(NEW_CLIP_PREFIX + "embeddings.token_embedding.weight")[1]
    heads = _known_heads()
    try:
        vit_heads, decoder_heads = heads["vit"][width], heads["decoder"][width]
        clip_heads = heads["clip"][clip_width]
    except KeyError:
        raise WeightsError(f"checkpoint {source}: widths {width}/{clip_width} match no known preset, and head "
                           f"counts cannot be read from tensor shapes; give its config.json with --config") from None
    clip = dict(preset("segvol").text_encoder.clip)
    clip.update(
        vocab_size=shape(NEW_CLIP_PREFIX + "embeddings.token_embedding.weight")[0],
        hidden_size=clip_width,
        intermediate_size=shape(NEW_CLIP_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=_count(state, re.escape(NEW_CLIP_PREFIX) + r"encoder\.layers\.(\d+)\."),
        num_attention_heads=clip_heads,
        max_position_embeddings=shape(NEW_CLIP_PREFIX + "embeddings.position_embedding.weight")[0],
    )
    config = SegVolConfig(
        name=name or f"segvol-{width}",
        image_encoder=ImageEncoderConfig(
            hidden_size=width,
            mlp_dim=shape("image_encoder.blocks.0.mlp.linear1.weight")[0],
            num_layers=_count(state, r"image_encoder\.blocks\.(\d+)\."),
            num_heads=vit_heads,
            qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        ),
        prompt_encoder=PromptEncoderConfig(mask_in_chans=shape("prompt_encoder.mask_downscaling.3.weight")[0]),
        mask_decoder=mask_decoder_config(state, decoder_heads, shape),
        text_encoder=TextEncoderConfig(kind="clip", clip=clip),
    )
    if name is None:  # call it by its preset name when it is one
        for known in ("segvol", "tiny"):
            candidate = preset(known)
            candidate.name = config.name
            if candidate == config:
                config.name = known
    return config
