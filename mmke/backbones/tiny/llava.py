"""The tiny LLaVA-v1.5: a small CLIP vision tower, LLaVA's two-layer MLP projector and a small
Llama, all real transformers classes, pretrained on the mini world and cached.

LLaVA's own recipe starts from a pretrained CLIP and trains projector + language model with the
vision tower frozen. Here stage 1 (``stage1.py``) stands in for CLIP's pretraining: every patch token
at the feature layer learns to describe its column of the picture. Stage 2 is
LLaVA's: projector + Llama on the train split's prompts, vision tower frozen. Loaded back through
``load_llava``, the code path of real llava-hf weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mmke.backbones.llava import LLAVA_PROMPT, LLAVA_TEXT_PROMPT, LlavaBackbone, load_llava, save_llava
from mmke.backbones.tiny.builder import build_folder, cached_build, shipped_root
from mmke.backbones.tiny.context import in_context_folder
from mmke.backbones.tiny.corpus import tokenizer_corpus
from mmke.backbones.tiny.pretrain import PretrainSpec
from mmke.backbones.tiny.recipe import fan_in_init, two_stage_training
from mmke.backbones.tiny.stage1 import Stage1Spec, representation_stage, token_of_each_column
from mmke.backbones.tiny.tokenizer import IMAGE, train_tokenizer
from mmke.data.miniworld.generate import MiniWorldSpec, ensure_miniworld

# Bump when the build recipe changes for the same settings, so caches are rebuilt.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class TinyLlavaSpec:
    vocab_size: int = 640
    patch_size: int = 16  # a 3x3 grid of patches: one per cell of the mini world
    vision_hidden: int = 64
    vision_layers: int = 3  # LLaVA reads the penultimate layer (vision_feature_layer=-2)
    text_hidden: int = 128
    text_layers: int = 4
    text_ffn: int = 344  # Llama's 8/3 x hidden, as a multiple of 8
    heads: int = 4
    max_positions: int = 256


def llama_config(vocab_size: int, hidden: int, layers: int, ffn: int, heads: int,
                 max_positions: int, pad_id: int, bos_id: int, eos_id: int) -> LlamaConfig:
    """A small Llama (Vicuna's architecture), untied embeddings as in Llama/Vicuna-7B."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=max_positions,
                       pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                       tie_word_embeddings=False)


def tiny_llava_model(spec: TinyLlavaSpec, image_size: int, image_token_id: int, pad_id: int,
                     bos_id: int, eos_id: int) -> LlavaForConditionalGeneration:
    """A randomly initialised LlavaForConditionalGeneration of the given size."""
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                              image_size=image_size, patch_size=spec.patch_size, attention_dropout=0.0)
    text = llama_config(spec.vocab_size, spec.text_hidden, spec.text_layers, spec.text_ffn,
                        spec.heads, spec.max_positions, pad_id, bos_id, eos_id)
    patches = (image_size // spec.patch_size) ** 2
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=image_token_id, image_seq_length=patches,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # see fan_in_init: keep the image signal alive from scratch
        fan_in_init(model.model.vision_tower, 1.0)
        fan_in_init(model.model.multi_modal_projector, 0.1)
    return model


def llava_stage1(backbone: LlavaBackbone, world: Path, spec: Stage1Spec) -> dict[str, float]:
    """Stand-in for CLIP pretraining: every patch token at the feature layer describes the column
    of the picture it lies in (``token_of_each_column``)."""
    model = backbone.model
    tower = model.model.vision_tower
    rows = model.config.vision_config.image_size // model.config.vision_config.patch_size

    def column_states(pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
        patches = hidden[model.config.vision_feature_layer][:, 1:]  # drop CLS, as LLaVA does
        return token_of_each_column(patches, rows)

    return representation_stage(column_states, list(tower.parameters()),
                                model.config.vision_config.hidden_size, model, backbone.pixels,
                                world, spec)


def build_tiny_llava(out: Path, world: Path, world_spec: MiniWorldSpec, spec: TinyLlavaSpec,
                     train: PretrainSpec, stage1: Stage1Spec, progress: bool = True) -> dict:
    """Train tokenizer and model on ``world`` and save both into ``out``; return the report."""
    torch.manual_seed(train.seed)
    corpus = [*tokenizer_corpus(world), LLAVA_PROMPT, LLAVA_TEXT_PROMPT]
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    model = tiny_llava_model(spec, world_spec.image_size, tokenizer.convert_tokens_to_ids(IMAGE),
                             tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    size = world_spec.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                      crop_size={"height": size, "width": size})
    backbone = LlavaBackbone(model, tokenizer, processor, name="tiny_llava", pixel_cache_size=100_000)
    first = (lambda: llava_stage1(backbone, world, stage1)) if stage1.steps else None
    report = two_stage_training(backbone, world, train, first,
                                list(model.model.vision_tower.parameters()), progress)
    save_llava(backbone, out)
    return report


def tiny_llava_build(cache_dir: str, world: dict | None = None, model: dict | None = None,
                     pretraining: dict | None = None, stage1: dict | None = None,
                     in_context: dict | None = None, progress: bool = True,
                     shipped: bool = True) -> Path:
    """The folder ``tiny_llava`` loads: the base build, or its in-context stage when
    ``in_context`` turns it on (``mmke.backbones.tiny.context``), each shipped or built."""
    world_spec = MiniWorldSpec(**(world or {}))
    spec = TinyLlavaSpec(**(model or {}))
    train = PretrainSpec(**(pretraining or {}))
    first = Stage1Spec(**(stage1 or {}))
    world_dir = ensure_miniworld(cache_dir, world_spec)
    folder, settings = build_folder(cache_dir, "tiny_llava", RECIPE_VERSION, world_spec,
                                    {"model": asdict(spec), "pretraining": asdict(train),
                                     "stage1": asdict(first)})
    cached_build(folder, lambda out: build_tiny_llava(out, world_dir, world_spec, spec, train,
                                                      first, progress),
                 settings, shipped_root(shipped))
    return in_context_folder(folder, in_context, world_dir,
                             lambda f: load_llava(str(f), device="cpu"), save_llava, progress,
                             shipped)


def tiny_llava(cache_dir: str, world: dict | None = None, model: dict | None = None,
               pretraining: dict | None = None, stage1: dict | None = None,
               in_context: dict | None = None, dtype: str = "float32", device: str = "auto",
               name: str = "tiny_llava", progress: bool = True,
               shipped: bool = True) -> LlavaBackbone:
    """The cached tiny LLaVA for these settings, shipped or built on first use if missing;
    ``in_context``: the in-context stage's settings (``mmke.backbones.tiny.context``), off by
    default; ``shipped=False`` builds on this machine even where a shipped build answers."""
    folder = tiny_llava_build(cache_dir, world, model, pretraining, stage1, in_context, progress,
                              shipped)
    return load_llava(str(folder), dtype=dtype, device=device, name=name)
