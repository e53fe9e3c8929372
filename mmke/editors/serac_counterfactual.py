"""SERAC's counterfactual model: answers an in-scope input with the retrieved edit in context.

Mitchell et al. (ICML 2022), §3: h_psi(z_e, x') is a (smaller) sequence model that reads the edit
z_e and the input x' together and predicts what the edited model should say. EasyEdit's
multimodal SERAC uses OPT-125m for BLIP-2 and feeds it the image through a learned Linear from the
vision features, then the edit's text, then the input's text.

Here the counterfactual model is a transformers causal LM that reads the backbone's token ids
(so it must share the backbone's tokenizer, as EasyEdit's pairs do: OPT-125m with BLIP-2's
OPT-2.7b) and one row is, left-padded:

    [edit prompt + new target, text only] [the input exactly as the backbone reads it]

where the input's image tokens carry ``vision(features)``: the backbone's language-space image
features (its projector's output, what the backbone's own language model reads) through a
Linear. EasyEdit projects the Q-Former output instead; for BLIP-2 the projector is one linear
map, so the two are the same family of functions. A square Linear starts at the identity: a
counterfactual model copied from the backbone's own language model then starts out reading the
picture exactly as the backbone does.

With ``top_layers`` N (``editor.counterfactual_trainable_layers``), the counterfactual model is the
backbone's own language model in which only the last N decoder layers are its own: copies,
trained in float32; the token embedding, the lower layers, the final norm and the LM head are the
backbone's modules, shared and frozen, and the image features go in as they are (no Linear).
That is EasyEdit's MiniGPT-4 SERAC (``SERAC_MULTI``: the replacement model is a second Vicuna-7B,
``LlamaForCausalLM.from_pretrained(small_name)`` with ``small_name`` the backbone's own Vicuna,
of which only the parameters of layer 31, the last of 32, train; the picture enters through the
backbone's own ``encode_img``), computed without the second copy of the frozen rest: a frozen
copy and the backbone's own module are the same function.

Logits come back in the backbone batch's layout (``[rows, seq, vocab]``, the input's positions
where they were), so the evaluator scores them like the backbone's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mmke.backbones.base import Backbone, ModelBatch
from mmke.backbones.greedy import greedy_settings
from mmke.backbones.weights import check_weights_path
from mmke.data.record import Prompt
from mmke.errors import ConfigError, check_choice

#: ``editor.counterfactual`` value for the backbone's own language model
BACKBONE = "backbone"
#: ``editor.counterfactual_init``: keep the checkpoint's weights, or only its architecture
INITS = ("pretrained", "random")


def load_counterfactual_lm(source: str, backbone: Backbone, init: str = "pretrained",
                           local_files_only: bool = True) -> PreTrainedModel:
    """The counterfactual model's language model, in float32: the backbone's own (``backbone``:
    its language model copied out) or a checkpoint (folder or hub id) read with
    transformers' Auto classes. ``init``: ``pretrained`` keeps the weights; ``random`` keeps
    only the architecture (the config), freshly initialised from torch's current seed. The
    vocabulary is resized to the backbone's when the sizes differ (new rows mean-initialised,
    as EasyEdit's add_padding does)."""
    check_choice("editor.counterfactual_init", init, INITS)
    if source == BACKBONE:
        if init == "random":  # the architecture alone: no copy of the weights is made
            lm = AutoModelForCausalLM.from_config(backbone.language_model_view().config)
        else:
            lm = backbone.language_model_copy()
    else:
        folder = check_weights_path(source, family="a causal language model sharing the "
                                    "backbone's tokenizer (e.g. facebook/opt-125m for BLIP-2 OPT)",
                                    local_files_only=local_files_only,
                                    setting="editor.counterfactual")
        check_same_tokenizer(folder, backbone, local_files_only)
        if init == "random":
            lm = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(folder, local_files_only=local_files_only))
        else:
            lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                      local_files_only=local_files_only)
    lm = lm.float()
    vocab = backbone_vocab(backbone)
    if lm.get_output_embeddings().weight.shape[0] != vocab:
        lm.resize_token_embeddings(vocab, mean_resizing=True)
    return lm


PROBE = "Question: What colour is the square? Short answer: red"


def check_same_tokenizer(folder: str, backbone: Backbone, local_files_only: bool) -> None:
    """The counterfactual model reads the backbone's token ids, so a checkpoint that ships a
    tokenizer must tokenize like the backbone's (OPT-125m does for BLIP-2 OPT; it does not for
    a Llama or Qwen backbone). A checkpoint without tokenizer files is taken on trust."""
    try:
        own = AutoTokenizer.from_pretrained(folder, local_files_only=local_files_only)
    except (OSError, ValueError, TypeError):
        return
    theirs = backbone.tokenizer
    if own(PROBE, add_special_tokens=False).input_ids != theirs(PROBE,
                                                               add_special_tokens=False).input_ids:
        raise ConfigError(
            f"editor.counterfactual={folder}: its tokenizer splits text differently from the "
            "backbone's, and the counterfactual model reads the backbone's token ids; use a "
            "causal LM of the backbone's family (EasyEdit: facebook/opt-125m for BLIP-2 OPT), or "
            "editor.counterfactual=backbone, e.g. with editor.counterfactual_trainable_layers=1 "
            "(EasyEdit's MiniGPT-4 setting: only the backbone's last layer is copied and trained)")


def backbone_vocab(backbone: Backbone) -> int:
    """The width of the backbone's logits."""
    return int(backbone.decoder.get_output_embeddings().weight.shape[0])


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first attended token (left padding), as generate does."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class _Unregistered:
    """A module held without registering it: its parameters stay out of the holder's
    ``parameters()``, ``state_dict()``, ``to()`` and ``train()``."""

    module: PreTrainedModel


class CounterfactualModel(nn.Module):
    """``lm`` (a causal LM over the backbone's vocabulary) and ``vision`` (the map from the
    backbone's language-space image features into ``lm``'s embeddings).

    Without ``top_layers``, ``lm`` is the model's own (a checkpoint or a copy), trained whole,
    and ``vision`` a Linear. With ``top_layers`` (the copies ``Backbone.language_model_top_copy``
    returns, ``lm`` the model they sit in), only those layers are the model's own: registered as
    ``layers``, they are all that trains and is saved; the rest of ``lm`` is the backbone's,
    frozen and left out of this module, and ``vision`` is the identity."""

    def __init__(self, lm: PreTrainedModel, vision_dim: int,
                 top_layers: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self._lm = _Unregistered(lm)
        hidden = lm.get_input_embeddings().embedding_dim
        if top_layers is None:
            self.lm = lm
            self.vision: nn.Module = nn.Linear(vision_dim, hidden)
            self._vision_dtype = torch.float32
            if vision_dim == hidden:
                with torch.no_grad():
                    self.vision.weight.copy_(torch.eye(hidden))
                    self.vision.bias.zero_()
        else:
            if vision_dim != hidden:
                raise ValueError(f"image features of width {vision_dim} cannot enter a language "
                                 f"model of width {hidden} as they are")
            self.layers = nn.ModuleList(top_layers)
            self.vision = nn.Identity()
            shared = self._vision_dtype = lm.get_input_embeddings().weight.dtype
            for layer in self.layers:
                # float32 weights, so that Adam's small steps are not rounded away on a bf16 or
                # fp16 backbone; the layers around them keep the backbone's dtype
                layer.float().requires_grad_(True)
                if shared != torch.float32:
                    layer.register_forward_pre_hook(_Cast(torch.float32).inputs, with_kwargs=True)
                    layer.register_forward_hook(_Cast(shared).output)

    def language_model(self) -> PreTrainedModel:
        """The causal LM the inputs run through (with ``top_layers``: the backbone's modules
        around this model's layers)."""
        return self._lm.module

    @property
    def device(self) -> torch.device:
        return self.language_model().get_input_embeddings().weight.device

    def prompt_embeds(self, batch: ModelBatch, image_rows: torch.Tensor | None) -> torch.Tensor:
        """The batch's inputs as ``lm`` embeds them, image positions from ``vision``: [B, S, H]."""
        embed = self.language_model().get_input_embeddings()
        ids = batch.input_ids.to(self.device)
        # image placeholder ids may lie outside a smaller model's vocabulary; they are replaced
        embeds = embed(ids.masked_fill(batch.image_token_mask.to(self.device), 0))
        if image_rows is not None and bool(batch.image_token_mask.any()):
            mask = batch.image_token_mask.to(self.device).unsqueeze(-1).expand_as(embeds)
            rows = self.vision(image_rows.to(self.device, self._vision_dtype))
            embeds = embeds.masked_scatter(mask, rows.to(embeds.dtype))
        return embeds

    def assemble(self, contexts: Sequence[Sequence[int]], embeds: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Rows [context; attended input], left-padded: (embeds [B, L, H], mask [B, L],
        position ids [B, L] counted from each row's first token, the input's length per row,
        whose positions are the last ones of each row)."""
        mask = mask.to(self.device).bool()
        ctx_embed = self.language_model().get_input_embeddings()
        lengths = [int(m.sum()) for m in mask]
        total = [len(c) + n for c, n in zip(contexts, lengths)]
        width = max(total)
        out = embeds.new_zeros(len(contexts), width, embeds.shape[-1])
        out_mask = torch.zeros(len(contexts), width, dtype=torch.long, device=self.device)
        for r, (ctx, n, t) in enumerate(zip(contexts, lengths, total)):
            start = width - t
            if ctx:
                ids = torch.tensor(list(ctx), device=self.device)
                out[r, start:start + len(ctx)] = ctx_embed(ids)
            out[r, width - n:] = embeds[r][mask[r]]
            out_mask[r, start:] = 1
        return out, out_mask, _positions(out_mask), lengths

    def forward(self, contexts: Sequence[Sequence[int]], batch: ModelBatch,
                image_rows: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, S, V]`` in the batch's layout: at each row's attended positions, the
        logits ``lm`` gives there with that row's context before it; zero at padding."""
        embeds = self.prompt_embeds(batch, image_rows)
        inputs, mask, positions, lengths = self.assemble(contexts, embeds, batch.attention_mask)
        logits = self.language_model()(inputs_embeds=inputs, attention_mask=mask,
                                       position_ids=positions, use_cache=False).logits.float()
        out = logits.new_zeros(*batch.input_ids.shape, logits.shape[-1])
        attended = batch.attention_mask.to(self.device).bool()
        for r, n in enumerate(lengths):
            out[r][attended[r]] = logits[r, logits.shape[1] - n:]
        return out

    @torch.no_grad()
    def generate(self, contexts: Sequence[Sequence[int]], prompts: Sequence[Prompt],
                 backbone: Backbone, max_new_tokens: int) -> list[str]:
        """Greedy answers to ``prompts`` (targets unread), each after its context; decoded and cut
        as the backbone cuts its own answers."""
        batch = backbone.collate([backbone.encode(p, with_target=False) for p in prompts])
        batch = batch.to(backbone.device, backbone.dtype)
        rows = backbone.image_rows(batch) if batch.pixel_values is not None else None
        inputs, mask, _, _ = self.assemble(contexts, self.prompt_embeds(batch, rows),
                                           batch.attention_mask)
        out = self.language_model().generate(inputs_embeds=inputs, attention_mask=mask,
                               **greedy_settings(max_new_tokens, backbone.stop_ids, backbone.pad_id))
        texts = backbone.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [backbone.answer_text(t) for t in texts]


class _Cast:
    """Forward hooks that cast every floating tensor among a module's inputs (``inputs``, a
    pre-hook with kwargs) or outputs (``output``) to ``dtype``, through tuples and lists."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def cast(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(self.dtype) if value.is_floating_point() else value
        if isinstance(value, (tuple, list)):
            return type(value)(self.cast(v) for v in value)
        return value

    def inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
               ) -> tuple[tuple, dict[str, Any]]:
        return self.cast(args), {k: self.cast(v) for k, v in kwargs.items()}

    def output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.cast(output)
