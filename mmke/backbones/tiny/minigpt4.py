"""The tiny MiniGPT-4, built the way MiniGPT-4 is: the tiny BLIP-2's vision tower and Q-Former
(read from its checkpoint folder, as the real one reads BLIP-2's), a new linear projection and a
small Llama standing in for Vicuna.

MiniGPT-4 trains only its projection on top of a frozen Vicuna. A tiny Llama knows nothing, so
here the projection and the Llama learn together (stage 2), with the BLIP-2 side frozen, as in
MiniGPT-4. The parts are saved in the released layout (``llama_proj`` in a checkpoint file, the
Llama in Hugging Face layout) and loaded back through ``load_minigpt4``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from mmke.backbones.minigpt4 import (ASSISTANT_MARKER, MINIGPT4_PROMPT, MINIGPT4_TEXT_PROMPT,
                                     MiniGPT4, MiniGPT4Backbone, load_blip2_vision, load_minigpt4,
                                     save_minigpt4_parts)
from mmke.backbones.tiny.blip2 import tiny_blip2_folder
from mmke.backbones.tiny.builder import build_folder, cached_build, shipped_root
from mmke.backbones.tiny.context import in_context_folder
from mmke.backbones.tiny.corpus import tokenizer_corpus
from mmke.backbones.tiny.llava import llama_config
from mmke.backbones.tiny.pretrain import PretrainSpec
from mmke.backbones.tiny.recipe import fan_in_init, two_stage_training
from mmke.backbones.tiny.tokenizer import train_tokenizer
from mmke.data.miniworld.generate import MiniWorldSpec, ensure_miniworld

# Bump when the build recipe changes for the same settings, so caches are rebuilt.
RECIPE_VERSION = 1
PROJECTION_FILE = "pretrained_minigpt4.pth"
LLAMA_FOLDER = "vicuna"


@dataclass(frozen=True)
class TinyMiniGPT4Spec:
    vocab_size: int = 640
    text_hidden: int = 128
    text_layers: int = 4
    text_ffn: int = 344
    heads: int = 4
    max_positions: int = 256


def build_tiny_minigpt4(out: Path, world: Path, blip2_folder: Path, spec: TinyMiniGPT4Spec,
                        train: PretrainSpec, progress: bool = True) -> dict:
    """Train tokenizer, projection and Llama on ``world`` over the tiny BLIP-2's frozen vision
    side; save projection and Llama into ``out``; return the report."""
    torch.manual_seed(train.seed)
    corpus = [*tokenizer_corpus(world), MINIGPT4_PROMPT, MINIGPT4_TEXT_PROMPT, ASSISTANT_MARKER]
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    vision, qformer, query_tokens = load_blip2_vision(str(blip2_folder), torch.float32)
    language_model = LlamaForCausalLM(llama_config(
        spec.vocab_size, spec.text_hidden, spec.text_layers, spec.text_ffn, spec.heads,
        spec.max_positions, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id))
    projection = nn.Linear(qformer.config.hidden_size, spec.text_hidden)
    with torch.no_grad():
        fan_in_init(projection, 0.1)  # image embeddings start near the size of text embeddings
    model = MiniGPT4(vision, qformer, query_tokens, projection, language_model)
    processor = BlipImageProcessorPil.from_pretrained(str(blip2_folder))
    backbone = MiniGPT4Backbone(model, tokenizer, processor, name="tiny_minigpt4",
                                pixel_cache_size=100_000)
    vision_side = [*vision.parameters(), *qformer.parameters(), query_tokens]
    report = two_stage_training(backbone, world, train, None, vision_side, progress,
                                vision_pretrained=True)
    report["blip2_checkpoint"] = blip2_folder.name
    save_minigpt4_parts(backbone, out / PROJECTION_FILE, out / LLAMA_FOLDER)
    return report


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def tiny_minigpt4_build(cache_dir: str, blip2: dict, world: dict | None = None,
                        model: dict | None = None, pretraining: dict | None = None,
                        in_context: dict | None = None, progress: bool = True,
                        shipped: bool = True) -> tuple[Path, Path]:
    """The folders ``tiny_minigpt4`` loads: the tiny BLIP-2 build it takes its vision side from,
    and its own base build or, when ``in_context`` turns it on, its in-context stage."""
    blip2, world = _plain(blip2), _plain(world)
    world_spec = MiniWorldSpec(**(world or {}))
    spec = TinyMiniGPT4Spec(**(_plain(model) or {}))
    train = PretrainSpec(**(_plain(pretraining) or {}))
    blip2_folder = tiny_blip2_folder(cache_dir, world, blip2.get("model"), blip2.get("pretraining"),
                                     blip2.get("stage1"), progress, shipped)
    world_dir = ensure_miniworld(cache_dir, world_spec)
    folder, settings = build_folder(cache_dir, "tiny_minigpt4", RECIPE_VERSION, world_spec,
                                    {"blip2": blip2_folder.name, "model": asdict(spec),
                                     "pretraining": asdict(train)})
    cached_build(folder, lambda out: build_tiny_minigpt4(out, world_dir, blip2_folder, spec, train,
                                                         progress),
                 settings, shipped_root(shipped))

    def load(f: Path) -> MiniGPT4Backbone:
        return load_minigpt4(str(blip2_folder), str(f / PROJECTION_FILE), str(f / LLAMA_FOLDER),
                             device="cpu")

    def save(backbone: MiniGPT4Backbone, out: Path) -> None:
        save_minigpt4_parts(backbone, out / PROJECTION_FILE, out / LLAMA_FOLDER)

    return blip2_folder, in_context_folder(folder, _plain(in_context), world_dir, load, save,
                                           progress, shipped)


def tiny_minigpt4(cache_dir: str, blip2: dict, world: dict | None = None,
                  model: dict | None = None, pretraining: dict | None = None,
                  in_context: dict | None = None, dtype: str = "float32", device: str = "auto",
                  name: str = "tiny_minigpt4", progress: bool = True,
                  shipped: bool = True) -> MiniGPT4Backbone:
    """The cached tiny MiniGPT-4 for these settings, shipped or built on first use (after the
    tiny BLIP-2 it takes its vision side from, itself cached). ``blip2`` holds the tiny BLIP-2's settings;
    ``in_context``: the in-context stage's settings (``mmke.backbones.tiny.context``), off by
    default (the vision side is BLIP-2's base build either way); ``shipped=False`` builds both
    on this machine even where shipped builds answer."""
    blip2_folder, folder = tiny_minigpt4_build(cache_dir, blip2, world, model, pretraining,
                                               in_context, progress, shipped)
    return load_minigpt4(str(blip2_folder), str(folder / PROJECTION_FILE),
                         str(folder / LLAMA_FOLDER), dtype=dtype, device=device, name=name)
