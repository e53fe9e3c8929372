"""The Backbone contract: everything architecture-specific lives behind it.

Editors, regularizers and the evaluator never spell a module path; they ask the backbone for
prompts-as-tensors, a forward pass, joint input embeddings, and editable modules by role.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from mmke.data.record import LazyImage, Prompt

IGNORE_INDEX = -100


@dataclass
class ModelBatch:
    """A padded batch of prompts. Padding is on the left so generation and scoring share layouts.

    ``labels`` hold the target token ids at the target positions and ``IGNORE_INDEX`` elsewhere
    (target-only labels). ``pixel_values`` holds each distinct image of the batch once, and
    ``image_index`` says, for each row with an image in row order, which entry it shows (a
    record's edit and rephrase prompts share one picture).
    Text-only rows have no image tokens. ``image_token_mask`` marks image-token positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_token_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_index: torch.Tensor
    #: Qwen2-VL only: the (temporal, height, width) patch grid of each distinct image, [n, 3]
    image_grid_thw: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                if dtype is not None and value.is_floating_point():
                    value = value.to(device=device, dtype=dtype)
                else:
                    value = value.to(device)
            moved[f.name] = value
        return ModelBatch(**moved)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) pairs whose logits predict a target token: position p predicts p+1."""
        shifted = self.labels[:, 1:] != IGNORE_INDEX
        rows, cols = shifted.nonzero(as_tuple=True)
        return rows, cols

    def target_ids(self) -> torch.Tensor:
        rows, cols = self.target_positions()
        return self.labels[rows, cols + 1]


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt + target, its labels (target-only), and its image if any."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    image: LazyImage | None


@dataclass
class ForwardOutput:
    """Logits over the whole padded sequence, and hidden states when asked (embeddings first)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class EditableModules(ABC):
    """The modules an editor may change, by role. Roles, not paths, cross this seam."""

    @property
    @abstractmethod
    def num_language_layers(self) -> int: ...

    @abstractmethod
    def language_layer(self, i: int) -> nn.Module: ...

    @abstractmethod
    def ffn_in(self, i: int) -> nn.Linear: ...

    @abstractmethod
    def ffn_out(self, i: int) -> nn.Linear: ...

    @abstractmethod
    def attention(self, i: int) -> nn.Module: ...

    def ffn_gate(self, i: int) -> nn.Linear | None:
        """The gate matrix of a gated FFN (SwiGLU); None where the FFN has no gate."""
        return None

    @abstractmethod
    def projector(self) -> nn.Module: ...

    @abstractmethod
    def vision_tower(self) -> nn.Module: ...

    def resolve_layer(self, i: int) -> int:
        """Python-style index (negative counts from the last layer) to an absolute layer index."""
        n = self.num_language_layers
        if not -n <= i < n:
            raise IndexError(f"language layer {i} out of range for a model with {n} layers")
        return i % n

    def by_role(self, role: str, layer: int | None = None) -> nn.Module:
        """Resolve a role name from config (``ffn_in``, ``ffn_out``, ``attention``, ``layer``,
        ``projector``, ``vision_tower``) to a module. The role names are the config vocabulary."""
        per_layer = {"ffn_in": self.ffn_in, "ffn_out": self.ffn_out, "ffn_gate": self.ffn_gate,
                     "attention": self.attention, "layer": self.language_layer}
        if role in per_layer:
            if layer is None:
                raise ValueError(f"role '{role}' needs a layer index")
            module = per_layer[role](self.resolve_layer(layer))
            if module is None:
                raise ValueError(f"this model's FFN has no '{role}' matrix")
            return module
        whole = {"projector": self.projector, "vision_tower": self.vision_tower}
        if role in whole:
            return whole[role]()
        raise ValueError(f"unknown module role '{role}'; known: {sorted(per_layer) + sorted(whole)}")


class Backbone(ABC):
    """An adapter over one multimodal LLM family (model + tokenizer + image processor)."""

    model: nn.Module
    family: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    @abstractmethod
    def modules(self) -> EditableModules: ...

    @abstractmethod
    def encode(self, prompt: Prompt, append_eos: bool = False,
               with_target: bool = True) -> EncodedPrompt:
        """Token ids of one prompt (family template, image tokens) and its target-only labels."""

    @abstractmethod
    def image_token_count(self, image: LazyImage) -> int:
        """How many image tokens this picture takes in a prompt (fixed per family, except for
        Qwen2-VL, whose dynamic resolution depends on the picture's size)."""

    @abstractmethod
    def collate(self, encoded: list[EncodedPrompt]) -> ModelBatch:
        """Pad encoded prompts (left) and attach their processed images."""

    def build_batch(self, prompts: Sequence[Prompt], append_eos: bool = False) -> ModelBatch:
        """Tokenize and pad ``prompts``; ``append_eos`` labels an end token after each target."""
        return self.collate([self.encode(p, append_eos) for p in prompts])

    @abstractmethod
    def embed(self, batch: ModelBatch) -> torch.Tensor:
        """Joint [vision; text] input embeddings of the batch, as the language model consumes them."""

    @abstractmethod
    def forward(self, batch: ModelBatch, *, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> ForwardOutput:
        """One forward of the whole batch; ``inputs_embeds`` overrides ``embed(batch)``."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers to the prompts (targets are ignored)."""

    def ffn_keys(self, batch: ModelBatch, layers: Sequence[int], *,
                 inputs_embeds: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """The FFN keys of ``layers``: the input of each layer's FFN output matrix (``ffn_out``),
        [batch, seq, ffn_dim], from one forward. Locate-then-edit methods (AlphaEdit, M-ORE,
        T-Patcher) solve for updates of ``ffn_out`` in terms of these keys."""
        keys: dict[int, torch.Tensor] = {}
        handles = []
        for i in layers:
            index = self.modules.resolve_layer(i)

            def capture(_module: nn.Module, args: tuple, index: int = index) -> None:
                # OPT flattens [batch, seq] before its FFN; give every family the same layout
                keys[index] = args[0].reshape(*batch.input_ids.shape, args[0].shape[-1])

            handles.append(self.modules.ffn_out(index).register_forward_pre_hook(capture))
        try:
            self.forward(batch, inputs_embeds=inputs_embeds)
        finally:
            for handle in handles:
                handle.remove()
        return keys

    def prepare(self, prompts: Sequence[Prompt], append_eos: bool = False) -> ModelBatch:
        """``build_batch`` moved to the model's device (floating tensors in the model's dtype);
        ``append_eos`` labels an end token after each target (an edit loss that teaches the
        model to stop after the new answer)."""
        return self.build_batch(prompts, append_eos=append_eos).to(self.device, self.dtype)

    def target_logits(self, batch: ModelBatch, logits: torch.Tensor) -> torch.Tensor:
        """Logits at every position that predicts a target token, flattened: [n_target_tokens, V]."""
        rows, cols = batch.target_positions()
        return logits[rows, cols]

    def nll(self, batch: ModelBatch, out: ForwardOutput, reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood of the target tokens (mean over tokens, or per prompt)."""
        logits = self.target_logits(batch, out.logits).float()
        targets = batch.target_ids()
        per_token = nn.functional.cross_entropy(logits, targets, reduction="none")
        if reduction == "mean":
            return per_token.mean()
        rows, _ = batch.target_positions()
        per_row = torch.zeros(len(batch), device=per_token.device).index_add_(0, rows, per_token)
        counts = torch.bincount(rows, minlength=len(batch)).clamp_min(1)
        return per_row / counts
