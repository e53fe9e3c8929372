"""BLIP-2 (OPT) over ``transformers.Blip2ForConditionalGeneration``: real loading and the adapter.

The adapter builds the joint [query features; text] embeddings itself, so one padded batch may
mix image prompts and text-only prompts (T-Loc) and be scored in a single language-model forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Blip2ForConditionalGeneration, PreTrainedTokenizerBase
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from mmke.backbones.base import (Backbone, EditableModules, EncodedPrompt, ForwardOutput,
                                 ModelBatch)
from mmke.backbones.encoding import collate_left, distinct_images, encode_pair
from mmke.backbones.caches import PixelCache, TokenCache
from mmke.backbones.greedy import greedy_settings
from mmke.backbones.roles import LayerRoles
from mmke.backbones.weights import check_weights_path
from mmke.data.record import LazyImage, Prompt
from mmke.devices import resolve_device, resolve_dtype


class Blip2Backbone(Backbone):
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
        self.num_query_tokens = int(config.num_query_tokens)
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
    def modules(self) -> EditableModules:
        return self._modules

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def _process_images(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def pixels(self, images: list[LazyImage]) -> torch.Tensor:
        """Processed pixel values of ``images`` (cached by path), [n, channels, height, width]."""
        return self._pixels.get(images)

    def encode(self, prompt: Prompt, append_eos: bool = False,
               with_target: bool = True) -> EncodedPrompt:
        """Token ids and target-only labels of one prompt; ``with_target=False`` for generation."""
        text = self.prompt_format.format(prompt.text)
        prefix = ([self.image_token_id] * self.num_query_tokens if prompt.image is not None else [])
        prefix += ([self.bos_id] if self.bos_id is not None else [])
        prefix += self._token_ids(text)
        target = self._token_ids(" " + prompt.target) if with_target else []
        if append_eos and self.eos_id is not None:
            target = target + [self.eos_id]
        return encode_pair(prefix, target, prompt.image, self.image_token_id,
                           self.num_query_tokens, where=f"{prompt.kind} prompt {text!r}")

    def image_token_count(self, image: LazyImage) -> int:
        return self.num_query_tokens

    def collate(self, encoded: list[EncodedPrompt]) -> ModelBatch:
        images, index = distinct_images(encoded)
        pixels = self.pixels(images) if images else None
        return collate_left(encoded, self.pad_id, self.image_token_id, pixels, index)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected Q-Former outputs, [n_images, num_query_tokens, lm_hidden]."""
        return self.model.get_image_features(pixel_values).pooler_output

    def embed(self, batch: ModelBatch) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(batch.input_ids)
        if batch.pixel_values is None:
            return embeds
        # Each distinct picture goes through the vision tower once, then to every row showing it;
        # image_token_mask is row-major and image_index is in row order, so they line up.
        features = self.image_features(batch.pixel_values)[batch.image_index].to(embeds.dtype)
        mask = batch.image_token_mask.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, features.reshape(-1, features.shape[-1]))

    def forward(self, batch: ModelBatch, *, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> ForwardOutput:
        embeds = self.embed(batch) if inputs_embeds is None else inputs_embeds
        out = self.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                  output_hidden_states=output_hidden_states, use_cache=False)
        return ForwardOutput(out.logits, out.hidden_states if output_hidden_states else None)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers, one left-padded batch, prompts encoded without their targets.

        Decoding stops at the tokenizer's end token; the answer is also cut at its first line
        break, because BLIP-2's OPT ends an answer with "\n" (LAVIS trains on ``text + "\n"``
        and generates with "\n" as its end token)."""
        encoded = [self.encode(p, with_target=False) for p in prompts]
        batch = self.collate(encoded).to(self.device, self.dtype)
        # with inputs_embeds only, generate returns the new tokens alone (no prompt ids to cut)
        out = self.language_model.generate(
            inputs_embeds=self.embed(batch), attention_mask=batch.attention_mask,
            **greedy_settings(max_new_tokens, self.eos_id, self.pad_id))
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [t.split("\n", 1)[0].strip() for t in texts]


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
