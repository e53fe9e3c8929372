"""BLIP-2 (OPT) over ``transformers.Blip2ForConditionalGeneration``: real loading and the adapter.

The adapter builds the joint [query features; text] embeddings itself, so one padded batch may
mix image prompts and text-only prompts (T-Loc) and be scored in a single language-model forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Blip2ForConditionalGeneration, PreTrainedTokenizerBase
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from mmke.backbones.base import EncodedPrompt
from mmke.backbones.encoding import encode_pair
from mmke.backbones.caches import PixelCache, TokenCache
from mmke.backbones.fixed import FixedImageTokens
from mmke.backbones.roles import LayerRoles
from mmke.backbones.weights import check_weights_path
from mmke.data.record import Prompt
from mmke.devices import resolve_device, resolve_dtype


class Blip2Backbone(FixedImageTokens):
    """Adapter over a loaded BLIP-2 model, its tokenizer and image processor.

    ``prompt_format`` wraps the task prompt (BLIP-2 was trained on bare prompts, so "{}").
    Layout of one image prompt: [image]*num_query_tokens, BOS, prompt, target (as the HF
    processor and LAVIS build it); text-only prompts drop the image tokens. ``bos_token=False``
    drops the BOS, as EasyEdit's BLIP-2 forward does (``add_special_tokens=False``), which the
    papers' numbers come from; ``conf/backbone/blip2.yaml`` sets that.
    """

    family = "blip2"

    def __init__(self, model: Blip2ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 image_processor: BlipImageProcessorPil, prompt_format: str = "{}",
                 name: str = "blip2", pixel_cache_size: int = 512,
                 bos_token: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt_format = prompt_format
        self.name = name
        config = model.config
        if config.image_token_index is None:
            raise ValueError("the BLIP-2 config has no image_token_index; use a checkpoint saved by "
                             "transformers >= 4.47 (its tokenizer has the <image> token)")
        self.image_token_id = int(config.image_token_index)
        self.num_image_tokens = int(config.num_query_tokens)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.bos_id = tokenizer.bos_token_id if bos_token else None
        self.eos_id = tokenizer.eos_token_id
        self._modules = LayerRoles(model.language_model.model.decoder.layers, ffn_in="fc1",
                                   ffn_out="fc2", attention="self_attn",
                                   projector=model.language_projection,
                                   vision_tower=model.vision_model)
        self._pixels = PixelCache(self._process_images, pixel_cache_size)
        self._token_ids = TokenCache(tokenizer)

    @property
    def decoder(self) -> nn.Module:
        return self.model.language_model

    def extend_context(self, positions: int) -> None:
        """OPT learns one embedding per position: the table grows to ``positions`` rows (after
        OPT's offset of 2), the known rows kept and the new ones tiled from them, so that a
        position past the old end starts as a position the model has read; training on longer
        sequences then tells them apart."""
        super().extend_context(positions)
        table = self.model.language_model.model.decoder.embed_positions
        old = table.weight.data
        offset = table.offset  # OPT's 2 reserved rows
        rows = positions + offset
        if rows <= old.shape[0]:
            return
        known = old[offset:]
        extra = known[torch.arange(rows - old.shape[0]) % known.shape[0]]
        table.weight = nn.Parameter(torch.cat([old, extra]), requires_grad=old.requires_grad)
        table.num_embeddings = rows

    def encode(self, prompt: Prompt, append_eos: bool = False,
               with_target: bool = True) -> EncodedPrompt:
        """Token ids and target-only labels of one prompt; ``with_target=False`` for generation."""
        text = self.prompt_format.format(prompt.text)
        prefix = ([self.image_token_id] * self.num_image_tokens if prompt.image is not None else [])
        prefix += ([self.bos_id] if self.bos_id is not None else [])
        prefix += self._token_ids(text)
        target = self._token_ids(" " + prompt.target) if with_target else []
        if append_eos and self.eos_id is not None:
            target = target + [self.eos_id]
        return encode_pair(prefix, target, prompt.image, self.image_token_id,
                           self.num_image_tokens, where=f"{prompt.kind} prompt {text!r}")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected Q-Former outputs, [n_images, num_query_tokens, lm_hidden]."""
        return self.model.get_image_features(pixel_values).pooler_output

    def answer_text(self, decoded: str) -> str:
        """Cut at the first line break: BLIP-2's OPT ends an answer with "\n" (LAVIS trains on
        ``text + "\n"`` and generates with "\n" as its end token)."""
        return decoded.split("\n", 1)[0].strip()


def load_blip2(path: str | None, dtype: str = "float32", device: str = "auto",
               device_map: str | dict | None = None, prompt_format: str = "{}",
               name: str = "blip2", local_files_only: bool = True,
               bos_token: bool = True) -> Blip2Backbone:
    """Load BLIP-2 weights (a local folder in Hugging Face layout, or a hub id when the hub is
    reachable and ``local_files_only`` is false) with its tokenizer and image processor.
    ``bos_token``: whether prompts start with OPT's BOS after the query tokens (see the adapter)."""
    source = check_weights_path(path, family="BLIP-2 (e.g. Salesforce/blip2-opt-2.7b)",
                                local_files_only=local_files_only)
    torch_dtype = resolve_dtype(dtype)
    model = Blip2ForConditionalGeneration.from_pretrained(
        source, dtype=torch_dtype, device_map=device_map, local_files_only=local_files_only)
    if device_map is None:
        model = model.to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    processor = BlipImageProcessorPil.from_pretrained(source, local_files_only=local_files_only)
    return Blip2Backbone(model, tokenizer, processor, prompt_format=prompt_format, name=name,
                         bos_token=bos_token)


def save_blip2(backbone: Blip2Backbone, folder: Path) -> None:
    """Write model, tokenizer and image processor in the layout ``load_blip2`` reads."""
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    backbone.image_processor.save_pretrained(folder)
