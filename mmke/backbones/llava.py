"""LLaVA-v1.5 over ``transformers.LlavaForConditionalGeneration`` (the llava-hf layout).

Prompt layout of llava-hf/llava-1.5-7b-hf: ``USER: <image>\\n{prompt} ASSISTANT:`` after BOS, the
``<image>`` placeholder expanded to one token per image patch (576 at 336 px); text-only prompts
(T-Loc) drop the placeholder: ``USER: {prompt} ASSISTANT:``. As for BLIP-2, the adapter builds the
joint embeddings itself so that image and text-only rows share one padded forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration,
                          PreTrainedTokenizerBase)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mmke.backbones.base import EncodedPrompt
from mmke.backbones.caches import PixelCache, TokenCache
from mmke.backbones.fixed import FixedImageTokens
from mmke.backbones.encoding import encode_pair, expand_placeholder, split_target
from mmke.backbones.roles import LayerRoles
from mmke.backbones.weights import check_weights_path
from mmke.data.record import Prompt
from mmke.devices import resolve_device, resolve_dtype

LLAVA_PROMPT = "USER: <image>\n{} ASSISTANT:"
LLAVA_TEXT_PROMPT = "USER: {} ASSISTANT:"


def llava_image_tokens(model: LlavaForConditionalGeneration) -> int:
    """Image tokens per picture: one per patch, plus CLS under the "full" feature strategy."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if model.config.vision_feature_select_strategy == "full" else 0)


class LlavaBackbone(FixedImageTokens):
    """Adapter over a loaded LLaVA model, its tokenizer and CLIP image processor.

    ``prompt_format`` must contain the tokenizer's image placeholder (``<image>``) once;
    ``text_prompt_format`` is used for prompts without an image.
    """

    family = "llava"

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 image_processor: CLIPImageProcessorPil, prompt_format: str = LLAVA_PROMPT,
                 text_prompt_format: str = LLAVA_TEXT_PROMPT, name: str = "llava",
                 pixel_cache_size: int = 512) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.image_token_id = int(model.config.image_token_id)
        placeholder = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if prompt_format.count(placeholder) != 1 or placeholder in text_prompt_format:
            raise ValueError(f"backbone.prompt_format must contain the image placeholder "
                             f"{placeholder!r} once and backbone.text_prompt_format none; got "
                             f"{prompt_format!r} and {text_prompt_format!r}")
        self.prompt_format = prompt_format
        self.text_prompt_format = text_prompt_format
        self.num_image_tokens = llava_image_tokens(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        inner = model.model
        self._modules = LayerRoles(inner.language_model.layers, ffn_in="mlp.up_proj",
                                   ffn_gate="mlp.gate_proj", ffn_out="mlp.down_proj",
                                   attention="self_attn", projector=inner.multi_modal_projector,
                                   vision_tower=inner.vision_tower)
        self._pixels = PixelCache(self._process_images, pixel_cache_size)
        self._token_ids = TokenCache(tokenizer)

    def encode(self, prompt: Prompt, append_eos: bool = False,
               with_target: bool = True) -> EncodedPrompt:
        fmt = self.prompt_format if prompt.image is not None else self.text_prompt_format
        text = fmt.format(prompt.text)
        if with_target:
            prompt_ids, target = split_target(self._token_ids, text, prompt.target)
        else:
            prompt_ids, target = self._token_ids(text), []
        if append_eos and self.eos_id is not None:
            target = target + [self.eos_id]
        prefix = [self.bos_id] if self.bos_id is not None else []
        prefix += (expand_placeholder(prompt_ids, self.image_token_id, self.num_image_tokens)
                   if prompt.image is not None else prompt_ids)
        return encode_pair(prefix, target, prompt.image, self.image_token_id,
                           self.num_image_tokens, where=f"{prompt.kind} prompt {text!r}")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected patch features of the configured vision layer, [n_images, tokens, hidden]."""
        features = self.model.model.get_image_features(pixel_values=pixel_values).pooler_output
        return torch.stack(list(features))

    def language_model_view(self) -> LlamaForCausalLM:
        """The Llama language model and LM head as a standalone ``LlamaForCausalLM`` whose modules
        are the backbone's own (the shell is built on the meta device: nothing is allocated)."""
        with torch.device("meta"):
            lm = LlamaForCausalLM(self.model.config.text_config)
        lm.model = self.model.model.language_model
        lm.lm_head = self.model.lm_head
        return lm


def load_llava(path: str | None, dtype: str = "float32", device: str = "auto",
               device_map: str | dict | None = None, prompt_format: str = LLAVA_PROMPT,
               text_prompt_format: str = LLAVA_TEXT_PROMPT, name: str = "llava",
               local_files_only: bool = True) -> LlavaBackbone:
    """Load LLaVA weights (a local folder in llava-hf layout, or a hub id when allowed) with its
    tokenizer and image processor."""
    source = check_weights_path(path, family="LLaVA-v1.5 (e.g. llava-hf/llava-1.5-7b-hf)",
                                local_files_only=local_files_only)
    model = LlavaForConditionalGeneration.from_pretrained(
        source, dtype=resolve_dtype(dtype), device_map=device_map,
        local_files_only=local_files_only)
    if device_map is None:
        model = model.to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    processor = CLIPImageProcessorPil.from_pretrained(source, local_files_only=local_files_only)
    return LlavaBackbone(model, tokenizer, processor, prompt_format=prompt_format,
                         text_prompt_format=text_prompt_format, name=name)


def save_llava(backbone: LlavaBackbone, folder: Path) -> None:
    """Write model, tokenizer and image processor in the layout ``load_llava`` reads."""
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    backbone.image_processor.save_pretrained(folder)
