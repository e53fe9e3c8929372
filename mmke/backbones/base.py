"""The Backbone contract: everything architecture-specific lives behind it.

Editors, regularizers and the evaluator never spell a module path; they ask the backbone for
prompts-as-tensors, a forward pass, joint input embeddings, and editable modules by role.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmke.backbones.greedy import greedy_settings
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

    def projector_out(self) -> nn.Linear:
        """The projector's last linear map, whose outputs are the language-space image features
        (the whole projector for BLIP-2 and MiniGPT-4; the second linear of LLaVA's MLP and of
        Qwen2-VL's merger). Closed-form editors of the projector (M-ORE) write this matrix."""
        linears = [m for m in self.projector().modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the projector has no linear map")
        return linears[-1]

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
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    eos_id: int | None
    image_token_id: int
    _modules: EditableModules

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def modules(self) -> EditableModules:
        """The editable modules by role (each adapter builds its ``LayerRoles`` once)."""
        return self._modules

    @property
    def decoder(self) -> nn.Module:
        """The module that maps ``inputs_embeds`` to logits and ``generate``s from them: the
        language model (BLIP-2, MiniGPT-4) or the whole model (LLaVA, Qwen2-VL)."""
        return self.model

    @property
    def context_length(self) -> int:
        """How many positions (image tokens included) the language model was built for: its text
        config's ``max_position_embeddings``. Prompt editors (IKE) check their prompts against it."""
        return int(self.decoder.config.get_text_config().max_position_embeddings)

    def extend_context(self, positions: int) -> None:
        """Let the language model read ``positions`` positions. Rotary-position families (Llama,
        Qwen2) compute positions, so only the config changes; families with learned positions
        (OPT) override this to add rows. Used by the tiny recipes' in-context stage, which then
        trains on the longer sequences."""
        if positions < self.context_length:
            raise ValueError(f"extend_context({positions}) would shrink the context of "
                             f"{self.context_length} positions")
        self.decoder.config.get_text_config().max_position_embeddings = positions

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

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Language-space features of each distinct image, [n_images, tokens, hidden]."""
        raise NotImplementedError(f"{type(self).__name__} reads its images in image_rows")

    def image_rows(self, batch: ModelBatch) -> torch.Tensor:
        """The features of every image-token position of the batch, row-major, [n, hidden]. Each
        distinct picture goes through the vision tower once, then to every row showing it;
        ``image_token_mask`` is row-major and ``image_index`` in row order, so they line up."""
        assert batch.pixel_values is not None
        features = self.image_features(batch.pixel_values)[batch.image_index]
        return features.reshape(-1, features.shape[-1])

    def embedding_ids(self, batch: ModelBatch) -> torch.Tensor:
        """The ids whose token embeddings ``embed`` starts from (image positions are replaced)."""
        return batch.input_ids

    def embed(self, batch: ModelBatch, image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Joint [vision; text] input embeddings of the batch, as the language model consumes
        them: token embeddings with the image features scattered over the image tokens.
        ``image_rows``: the batch's ``image_rows`` when the caller has them already (SERAC
        feeds them to its counterfactual model too), so the vision tower runs once."""
        embeds = self.decoder.get_input_embeddings()(self.embedding_ids(batch))
        if batch.pixel_values is None:
            return embeds
        rows = self.image_rows(batch) if image_rows is None else image_rows
        mask = batch.image_token_mask.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, rows.to(embeds.dtype))

    def language_model_view(self) -> PreTrainedModel:
        """A standalone causal language model (a transformers ``*ForCausalLM``) made of this
        backbone's own language modules, nothing copied: token embedding, decoder layers, final
        norm and LM head are the backbone's objects. It reads the backbone's token ids and its
        logits span the backbone's vocabulary. Here ``decoder``, which is that model for BLIP-2
        and MiniGPT-4; adapters whose decoder is the whole multimodal model (LLaVA, Qwen2-VL)
        build a causal LM around their language modules."""
        if self.decoder is self.model:
            raise NotImplementedError(f"{type(self).__name__} must say how its language model is "
                                      "taken out of the multimodal model")
        return self.decoder

    def language_model_copy(self) -> PreTrainedModel:
        """``language_model_view`` as an independent copy (every weight copied): SERAC's
        counterfactual model starts from it on the embedded default."""
        return copy.deepcopy(self.language_model_view())

    def language_model_top_copy(self, layers: int) -> tuple[PreTrainedModel, list[nn.Module]]:
        """``language_model_view`` with its last ``layers`` decoder layers replaced by copies, and
        those copies (first to last). Every other module (token embedding, the lower layers,
        final norm, LM head) stays this backbone's own object, shared, not copied: a
        counterfactual model that trains the top layers only costs their copies, not a second
        language model."""
        total = self.modules.num_language_layers
        if not 1 <= layers <= total:
            raise ValueError(f"language_model_top_copy({layers}): the language model has "
                             f"{total} layers")
        view = self.language_model_view()
        top = [self.modules.language_layer(i) for i in range(total - layers, total)]
        names = {id(m): name for name, m in view.named_modules()}
        missing = [i for i, m in enumerate(top) if id(m) not in names]
        if missing:
            raise ValueError(f"{type(self).__name__}: language layers {missing} are not part of "
                             "language_model_view")
        # copied: the top layers (with everything in them) and the modules that hold them (a new
        # root and layer list, so the backbone's own are left as they are); all else is shared
        copied = {id(m) for layer in top for m in layer.modules()}
        holders = {prefix for m in top for prefix in _prefixes(names[id(m)])}
        memo: dict[int, object] = {}
        for name, module in view.named_modules():
            if id(module) in copied:
                continue
            if name in holders:  # a holder's own tensors are shared too
                tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                memo.update({id(t): t for t in tensors})
            else:
                memo[id(module)] = module
        lm = copy.deepcopy(view, memo)
        return lm, [memo[id(m)] for m in top]  # deepcopy records each copy under its original

    def forward_inputs(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        """Extra inputs of the decoder's forward besides the embeddings and mask (Qwen2-VL's
        M-RoPE positions)."""
        return {}

    def forward(self, batch: ModelBatch, *, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> ForwardOutput:
        """One forward of the whole batch; ``inputs_embeds`` overrides ``embed(batch)``."""
        embeds = self.embed(batch) if inputs_embeds is None else inputs_embeds
        out = self.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                           output_hidden_states=output_hidden_states, use_cache=False,
                           **self.forward_inputs(batch))
        return ForwardOutput(out.logits, out.hidden_states if output_hidden_states else None)

    @property
    def stop_ids(self) -> int | list[int] | None:
        """The token id(s) greedy decoding stops at."""
        return self.eos_id

    def answer_text(self, decoded: str) -> str:
        """A decoded answer cut where the family ends an answer (see each adapter)."""
        return decoded.strip()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers to the prompts, one left-padded batch, prompts encoded without their
        targets; decoding stops at ``stop_ids`` and ``answer_text`` cuts each answer."""
        encoded = [self.encode(p, with_target=False) for p in prompts]
        batch = self.collate(encoded).to(self.device, self.dtype)
        # with inputs_embeds only, generate returns the new tokens alone (no prompt ids to cut)
        out = self.decoder.generate(inputs_embeds=self.embed(batch),
                                    attention_mask=batch.attention_mask,
                                    **greedy_settings(max_new_tokens, self.stop_ids, self.pad_id))
        return [self.answer_text(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

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


def _prefixes(name: str) -> list[str]:
    """The dotted name of a module and of every module above it ("" is the root)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]
