"""Randomly initialised tiny backbones of every family, for contract tests that need no knowledge.

Each is the family's real adapter over a small config of its real classes, with a tokenizer that
knows the family's template markers. Built in well under a second each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mmke.backbones.base import Backbone
from mmke.backbones.blip2 import Blip2Backbone
from mmke.backbones.llava import LlavaBackbone
from mmke.backbones.minigpt4 import MiniGPT4, MiniGPT4Backbone
from mmke.backbones.qwen2vl import Qwen2VLBackbone
from mmke.backbones.tiny.blip2 import TinyBlip2Spec, tiny_blip2_model
from mmke.backbones.tiny.llava import TinyLlavaSpec, llama_config, tiny_llava_model
from mmke.backbones.tiny.qwen2vl import TinyQwen2VLSpec, tiny_image_processor, tiny_qwen2vl_model
from mmke.backbones.tiny.tokenizer import IMAGE, train_tokenizer

QWEN_MARKERS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
CORPUS = ["Question: What colour is the square? Short answer: red blue",
          "nq question: a photo of green circle", "USER: ASSISTANT:",
          "###Human: <Img></Img> ###Assistant:", "system You are a helpful assistant. user"]
VOCAB = 320
SIZE = 48


def _tokenizer():
    return train_tokenizer(CORPUS, VOCAB, extra_special=QWEN_MARKERS)


def random_blip2() -> Backbone:
    tok = _tokenizer()
    model = tiny_blip2_model(TinyBlip2Spec(vocab_size=VOCAB, text_layers=3, num_query_tokens=4),
                             SIZE, tok.convert_tokens_to_ids(IMAGE), tok.pad_token_id,
                             tok.bos_token_id, tok.eos_token_id)
    return Blip2Backbone(model, tok, BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                         name="random_blip2")


def random_llava() -> Backbone:
    tok = _tokenizer()
    model = tiny_llava_model(TinyLlavaSpec(vocab_size=VOCAB, text_layers=3), SIZE,
                             tok.convert_tokens_to_ids(IMAGE), tok.pad_token_id,
                             tok.bos_token_id, tok.eos_token_id)
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                      crop_size={"height": SIZE, "width": SIZE})
    return LlavaBackbone(model, tok, processor, name="random_llava")


def random_minigpt4() -> Backbone:
    tok = _tokenizer()
    blip2 = tiny_blip2_model(TinyBlip2Spec(vocab_size=VOCAB, text_layers=1, num_query_tokens=4),
                             SIZE, tok.convert_tokens_to_ids(IMAGE), tok.pad_token_id,
                             tok.bos_token_id, tok.eos_token_id)
    llama = LlamaForCausalLM(llama_config(VOCAB, 128, 3, 344, 4, 256, tok.pad_token_id,
                                          tok.bos_token_id, tok.eos_token_id))
    model = MiniGPT4(blip2.vision_model, blip2.qformer, blip2.query_tokens,
                     nn.Linear(blip2.config.qformer_config.hidden_size, 128), llama)
    processor = BlipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    return MiniGPT4Backbone(model, tok, processor, name="random_minigpt4")


def random_qwen2vl() -> Backbone:
    tok = _tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_MARKERS}
    spec = TinyQwen2VLSpec(vocab_size=VOCAB, text_layers=3)
    model = tiny_qwen2vl_model(spec, ids["<|image_pad|>"], ids["<|video_pad|>"],
                               ids["<|vision_start|>"], ids["<|vision_end|>"], tok.pad_token_id,
                               ids["<|im_end|>"])
    return Qwen2VLBackbone(model, tok, tiny_image_processor(spec, SIZE), name="random_qwen2vl")


FAMILIES: dict[str, Callable[[], Backbone]] = {
    "blip2": random_blip2,
    "llava": random_llava,
    "minigpt4": random_minigpt4,
    "qwen2vl": random_qwen2vl,
}


def build(family: str) -> Backbone:
    torch.manual_seed(0)
    return FAMILIES[family]()
