"""ConMoAE: hierarchy-routed adapter experts attached to the transformer blocks of any backbone.

MedSegX adds, in parallel with each block's MLP and on the same post-norm input ``h``,

    x = x + mlp(h) + scale * sum_e g_e * up_e(dropout(gelu(down_e(h))))

where the gate ``g`` (one vector per sample and block, shared by all tokens) is routed from the anatomical context:

    e_root, e_L1, e_L2, e_L3, e_task, e_modality = context tables [rows from the hierarchy]
    a     = softmax(organ_gate(concat[e_root, e_L1, e_L2, e_L3]))        hierarchy attention
    organ = sum_i a_i * e_i
    image = input_embed(mean of h over all tokens)                        image summary
    g     = softmax(gate(concat[organ, e_task, e_modality, image])))      dense soft mixture, no top-k

The experts are attached with a forward hook on each block's ``mlp`` module, which adds the mixture to its output.
``h`` is the mlp's input for blocks of the form ``x + mlp(norm(x))`` (SegVol, SAM, MONAI); an mlp that holds its
own pre-norm (TinyViT's ``TinyViTMLP``: ``x + mlp(x)``, norm inside) names it in ``EXPERT_INPUT``, and ``h`` is that
submodule's output, caught by a second hook: the experts see the post-norm tokens in both layouts. Nothing in the
backbone changes (parameter names included, so the base weights still load by name), and blocks whose ``forward``
takes no context argument (MONAI's, TinyViT's) need no change: the context is set for a forward with
``with experts.context(ctx): model(...)``. Without a context the explicit "unknown" rows are used.

Initialisation makes an attached, untrained ConMoAE an identity: up-projections and context tables are zero.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..data.hierarchy import ContextIndices, load_hierarchy
from ..errors import WeightsError

CONTEXT_TABLES = ("root", "level1", "level2", "level3", "task", "modality")   # ContextIndices.rows() order
HIERARCHY_LEVELS = 4   # root, level1, level2, level3 take part in the hierarchy attention
GATE_INPUTS = 4        # organ, task, modality, image summary

ContextLike = Union[ContextIndices, Sequence[ContextIndices], torch.Tensor, None]


@dataclass
class ConMoAEConfig:
    n_experts: int = 4
    bottleneck: int = 16
    context_dim: int = 16
    scale: float = 0.1
    dropout: float = 0.1
    blocks: Optional[List[int]] = None         # indices of the blocks that get experts; None = all
    table_rows: Dict[str, int] = field(default_factory=dict)   # rows per context table; {} = the hierarchy's
    hierarchy_version: str = ""

    def __post_init__(self) -> None:
        if not self.table_rows or not self.hierarchy_version:
            hierarchy = load_hierarchy()
            self.table_rows = dict(self.table_rows or hierarchy.table_sizes())
            self.hierarchy_version = self.hierarchy_version or hierarchy.version
        missing = [name for name in CONTEXT_TABLES if name not in self.table_rows]
        if missing:
            raise WeightsError(f"ConMoAE config: table_rows lacks {', '.join(missing)}")
        if self.n_experts < 1 or self.bottleneck < 1 or self.context_dim < 1:
            raise WeightsError(f"ConMoAE config: n_experts, bottleneck and context_dim must be >= 1 "
                               f"(got {self.n_experts}, {self.bottleneck}, {self.context_dim})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "ConMoAEConfig":
        return cls(**dict(data))


class ContextTables(nn.Module):
    """One zero-initialised embedding table per context level; each table's last row is "unknown"."""

    def __init__(self, table_rows: Mapping[str, int], dim: int):
        super().__init__()
        self.tables = nn.ModuleDict({name: nn.Embedding(int(table_rows[name]), dim) for name in CONTEXT_TABLES})
        for table in self.tables.values():
            nn.init.zeros_(table.weight)

    def unknown_rows(self) -> torch.Tensor:
        return torch.tensor([self.tables[name].num_embeddings - 1 for name in CONTEXT_TABLES])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, 6) in ``CONTEXT_TABLES`` order -> embeddings (B, 6, dim)."""
        for column, name in enumerate(CONTEXT_TABLES):
            limit = self.tables[name].num_embeddings
            if int(rows[:, column].min()) < 0 or int(rows[:, column].max()) >= limit:
                raise WeightsError(f"context {name} row {rows[:, column].tolist()} is outside its table "
                                   f"(0..{limit - 1}): the hierarchy and the experts do not match")
        return torch.stack([self.tables[name](rows[:, column]) for column, name in enumerate(CONTEXT_TABLES)], 1)


class BlockExperts(nn.Module):
    """The experts and router of one block. Parameter names follow MedSegX (``adapter_*``)."""

    def __init__(self, width: int, config: ConMoAEConfig):
        super().__init__()
        e = config.context_dim
        self.scale = config.scale
        self.adapter_down = nn.ModuleList(nn.Linear(width, config.bottleneck) for _ in range(config.n_experts))
        self.adapter_up = nn.ModuleList(nn.Linear(config.bottleneck, width) for _ in range(config.n_experts))
        self.adapter_organ_gate = nn.Linear(HIERARCHY_LEVELS * e, HIERARCHY_LEVELS)
        self.adapter_gate = nn.Linear(GATE_INPUTS * e, config.n_experts)
        self.adapter_input_embed = nn.Linear(width, e)
        self.dropout = nn.Dropout(config.dropout)
        for down in self.adapter_down:       # kaiming-uniform down, zero bias; zero up: the experts start silent
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
        for up in self.adapter_up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def summarise(self, h: torch.Tensor) -> torch.Tensor:
        """The image summary: input_embed(mean of h over all tokens), (B, E)."""
        return self.adapter_input_embed(h.reshape(h.shape[0], -1, h.shape[-1]).mean(1))

    def route(self, context: torch.Tensor, summary: torch.Tensor) -> Dict[str, torch.Tensor]:
        """context (B, 6, E), summary (B, E) -> hierarchy attention, gate logits and gates (B, n_experts)."""
        hierarchy = context[:, :HIERARCHY_LEVELS]                             # root, L1, L2, L3
        attention = F.softmax(self.adapter_organ_gate(hierarchy.flatten(1)), dim=-1)
        organ = (attention.unsqueeze(-1) * hierarchy).sum(1)
        task, modality = context[:, 4], context[:, 5]
        logits = self.adapter_gate(torch.cat([organ, task, modality, summary], dim=-1))
        return {"hierarchy_attention": attention, "gate_logits": logits, "gates": F.softmax(logits, dim=-1)}

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled mixture to add to the MLP output, and the gates (B, n_experts).

        ``sum_e g_e * up_e(a_e)`` is computed as one product: ``[W_up_1 .. W_up_n] @ (g * [a_1 .. a_n]) +
        sum_e g_e * b_up_e`` with ``a_e = dropout(gelu(down_e(h)))`` from one product of the stacked
        down-projections. The same mathematics as one expert after another, but two matrix products over the
        tokens instead of 2n and no full-width tensor per expert (on TinyViT's 128 x 128-token stage the per-expert
        loop cost as much as the block's own MLP)."""
        gates = self.route(context, self.summarise(h))["gates"].to(h.dtype)
        token_axes = (1,) * (h.ndim - 2)
        down_weight = torch.cat([down.weight for down in self.adapter_down])           # (n * b, C)
        down_bias = torch.cat([down.bias for down in self.adapter_down])
        hidden = self.dropout(F.gelu(F.linear(h, down_weight.to(h.dtype), down_bias.to(h.dtype))))
        bottleneck = self.adapter_down[0].out_features
        weights = gates.repeat_interleave(bottleneck, dim=1).view(gates.shape[0], *token_axes, -1)
        up_weight = torch.cat([up.weight for up in self.adapter_up], dim=1)            # (C, n * b)
        up_bias = gates @ torch.stack([up.bias for up in self.adapter_up]).to(h.dtype)  # (B, C)
        mixture = F.linear(hidden * weights, up_weight.to(h.dtype)) + up_bias.view(gates.shape[0], *token_axes, -1)
        return self.scale * mixture, gates


class ConMoAE(nn.Module):
    """Experts for a list of blocks plus the shared context tables. Made by ``attach_experts``.

    Register it in the model (``model.conmoae = experts``, done by ``attach_experts_to_model``) so that ``.to()``,
    ``state_dict()`` and DistributedDataParallel see its parameters."""

    def __init__(self, widths: Sequence[int], block_indices: Sequence[int], config: ConMoAEConfig):
        super().__init__()
        self.config = config
        self.block_indices = list(block_indices)
        self.context_tables = ContextTables(config.table_rows, config.context_dim)
        self.experts = nn.ModuleList(BlockExperts(width, config) for width in widths)
        self._rows: Optional[torch.Tensor] = None
        self._handles: list = []
        self.last_gates: Dict[int, torch.Tensor] = {}     # block index -> (B, n_experts), detached

    # ---- context
    @contextlib.contextmanager
    def context(self, context: ContextLike) -> Iterator["ConMoAE"]:
        """Use these context rows for the forwards inside the block (per sample, or one for the whole batch)."""
        previous, self._rows = self._rows, self._as_rows(context)
        try:
            yield self
        finally:
            self._rows = previous

    def _as_rows(self, context: ContextLike) -> Optional[torch.Tensor]:
        if context is None:
            return None
        if isinstance(context, ContextIndices):
            return torch.tensor([context.rows()], dtype=torch.long)
        if isinstance(context, torch.Tensor):
            rows = context.long()
            return rows.unsqueeze(0) if rows.ndim == 1 else rows
        return torch.tensor([c.rows() for c in context], dtype=torch.long)

    def _context_embeddings(self, batch: int, device: torch.device) -> torch.Tensor:
        rows = self._rows if self._rows is not None else self.context_tables.unknown_rows().unsqueeze(0)
        rows = rows.to(device)
        if rows.shape[0] == 1 and batch > 1:
            rows = rows.expand(batch, -1)
        if rows.shape[0] != batch:
            raise WeightsError(f"ConMoAE context has {rows.shape[0]} samples but the batch has {batch}: give one "
                               f"context per sample or one for all")
        return self.context_tables(rows)

    # ---- hooks
    def _hook(self, position: int, caught: Optional[Dict[int, torch.Tensor]] = None):
        """The hook on block ``position``'s mlp; ``caught``: where the hook on the mlp's own pre-norm left h."""
        def add_experts(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            h = inputs[0] if caught is None else caught.pop(position)
            context = self._context_embeddings(h.shape[0], h.device).to(h.dtype)
            mixture, gates = self.experts[position](h, context)
            self.last_gates[self.block_indices[position]] = gates.detach()
            return output + mixture
        return add_experts

    def attach(self, blocks: Sequence[nn.Module]) -> None:
        if self._handles:
            raise RuntimeError("these experts are already attached; call detach() first")
        caught: Dict[int, torch.Tensor] = {}
        for position, index in enumerate(self.block_indices):
            mlp = blocks[index].mlp
            own_norm = _own_pre_norm(mlp, index)
            if own_norm is None:
                self._handles.append(mlp.register_forward_hook(self._hook(position)))
                continue

            def catch(module, inputs, output, position=position):
                caught[position] = output
            self._handles.append(own_norm.register_forward_hook(catch))
            self._handles.append(mlp.register_forward_hook(self._hook(position, caught)))

    def detach(self) -> None:
        """Remove the hooks: the backbone computes exactly what it did before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)


def _own_pre_norm(mlp: nn.Module, position: int) -> Optional[nn.Module]:
    """The submodule an mlp names in ``EXPERT_INPUT`` (its own pre-norm, whose output is h), or None."""
    name = getattr(mlp, "EXPERT_INPUT", None)
    if name is None:
        return None
    module = getattr(mlp, name, None)
    if not isinstance(module, nn.Module):
        raise WeightsError(f"block {position}: its mlp names {name!r} as the experts' input but has no such module")
    return module


def _mlp_width(block: nn.Module, position: int) -> int:
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        raise WeightsError(f"block {position} ({type(block).__name__}) has no 'mlp' module; ConMoAE needs blocks "
                           f"of the form x + mlp(norm(x))")
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise WeightsError(f"block {position}: its mlp has no Linear layer to read the width from")
    return linears[0].in_features


def attach_experts(blocks: Sequence[nn.Module], config: Optional[ConMoAEConfig] = None) -> ConMoAE:
    """Attach experts to ``blocks[i].mlp`` for each selected block; returns the (attached) ConMoAE module."""
    config = config or ConMoAEConfig()
    selected = list(range(len(blocks))) if config.blocks is None else list(config.blocks)
    for index in selected:
        if not -len(blocks) <= index < len(blocks):
            raise WeightsError(f"ConMoAE config: block {index} does not exist (the backbone has {len(blocks)})")
    selected = [index % len(blocks) for index in selected]
    experts = ConMoAE([_mlp_width(blocks[i], i) for i in selected], selected, config)
    experts.attach(blocks)
    return experts


def find_blocks(model: nn.Module) -> Sequence[nn.Module]:
    """The transformer blocks of a model: ``image_encoder.blocks`` (SegVol, SAM), ``blocks`` (a bare ViT) or
    ``image_encoder.transformer_blocks`` (TinyViT: the blocks of its attention stages, in order; its first stage
    is convolutional)."""
    for path in ("image_encoder.blocks", "blocks", "image_encoder.transformer_blocks"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, (nn.ModuleList, list)) and module:
            return module
    raise WeightsError(f"{type(model).__name__} has none of image_encoder.blocks, blocks or "
                       f"image_encoder.transformer_blocks: attach experts with attach_experts(blocks, config)")


def attach_experts_to_model(model: nn.Module, config: Optional[ConMoAEConfig] = None) -> ConMoAE:
    """Attach to the model's blocks and register the experts as ``model.conmoae`` (moved/saved with it)."""
    if isinstance(getattr(model, "conmoae", None), ConMoAE):
        raise WeightsError("this model already has experts attached (model.conmoae)")
    experts = attach_experts(find_blocks(model), config)
    experts.train(model.training)     # a new module is in training mode: follow the model (no dropout in eval)
    model.conmoae = experts
    return experts
