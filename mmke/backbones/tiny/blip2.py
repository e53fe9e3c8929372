"""The tiny BLIP-2: a few hundred thousand parameters of the real transformers classes,
pretrained on the mini world's train split on the CPU and cached under ``paths.cache_dir``.

It is loaded back through ``load_blip2``, the same code path as real BLIP2-OPT weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                          Blip2VisionConfig, OPTConfig)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from mmke.backbones.blip2 import Blip2Backbone, load_blip2, save_blip2
from mmke.backbones.tiny.builder import build_folder, cached_build, shipped_root
from mmke.backbones.tiny.context import in_context_folder
from mmke.backbones.tiny.corpus import tokenizer_corpus
from mmke.backbones.tiny.pretrain import PretrainSpec
from mmke.backbones.tiny.recipe import fan_in_init, two_stage_training
from mmke.backbones.tiny.stage1 import Stage1Spec, representation_stage
from mmke.backbones.tiny.tokenizer import IMAGE, train_tokenizer
from mmke.data.miniworld.generate import MiniWorldSpec, ensure_miniworld
from mmke.data.miniworld.vocab import COLUMNS

# Bump when the build recipe changes for the same settings, so caches are rebuilt.
RECIPE_VERSION = 4


@dataclass(frozen=True)
class TinyBlip2Spec:
    vocab_size: int = 640
    patch_size: int = 16  # a 3x3 grid: one cell per column and row of the mini world
    vision_hidden: int = 64
    vision_layers: int = 2
    qformer_hidden: int = 64
    qformer_layers: int = 2
    cross_attention_frequency: int = 2
    num_query_tokens: int = 8
    text_hidden: int = 128
    text_layers: int = 4
    text_ffn: int = 512
    heads: int = 4
    max_positions: int = 128


def tiny_blip2_model(spec: TinyBlip2Spec, image_size: int, image_token_id: int,
                     pad_id: int, bos_id: int, eos_id: int) -> Blip2ForConditionalGeneration:
    """A randomly initialised Blip2ForConditionalGeneration of the given size."""
    vision = Blip2VisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                               num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                               image_size=image_size, patch_size=spec.patch_size,
                               # the class default (1e-10) assumes loaded weights; from scratch
                               # it leaves the vision tower at zero and the image is ignored
                               initializer_range=0.02, attention_dropout=0.0)
    qformer = Blip2QFormerConfig(hidden_size=spec.qformer_hidden, num_hidden_layers=spec.qformer_layers,
                                 num_attention_heads=spec.heads, intermediate_size=2 * spec.qformer_hidden,
                                 encoder_hidden_size=spec.vision_hidden, vocab_size=2,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 cross_attention_frequency=spec.cross_attention_frequency)
    text = OPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.text_hidden,
                     num_hidden_layers=spec.text_layers, ffn_dim=spec.text_ffn,
                     num_attention_heads=spec.heads, max_position_embeddings=spec.max_positions,
                     word_embed_proj_dim=spec.text_hidden, pad_token_id=pad_id,
                     bos_token_id=bos_id, eos_token_id=eos_id, dropout=0.0,
                     attention_dropout=0.0)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=spec.num_query_tokens,
                         image_token_index=image_token_id)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)  # zeros in transformers; BLIP-2's recipe draws them
        # BERT-style init hides the image behind the Q-Former (see fan_in_init)
        for part, gain in ((model.vision_model, 1.0), (model.qformer, 1.0),
                           (model.language_projection, 0.1)):
            fan_in_init(part, gain)
    return model


def query_states(model: Blip2ForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Q-Former outputs before the language projection, [n, num_query_tokens, hidden]."""
    image_embeds = model.vision_model(pixel_values).last_hidden_state
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
    return model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=mask).last_hidden_state


def blip2_stage1(backbone: Blip2Backbone, world: Path, spec: Stage1Spec) -> dict[str, float]:
    """BLIP-2's stage 1: vision tower, Q-Former and query tokens; query token c describes column c."""
    model = backbone.model
    if model.config.num_query_tokens < len(COLUMNS):
        raise ValueError(f"stage 1 needs at least {len(COLUMNS)} query tokens, "
                         f"got {model.config.num_query_tokens}")
    params = [*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens]
    return representation_stage(lambda px: query_states(model, px)[:, :len(COLUMNS)], params,
                                model.config.qformer_config.hidden_size, model, backbone.pixels,
                                world, spec)


def build_tiny_blip2(out: Path, world: Path, world_spec: MiniWorldSpec, spec: TinyBlip2Spec,
                     train: PretrainSpec, stage1: Stage1Spec, progress: bool = True) -> dict:
    """Train tokenizer and model on ``world`` and save both into ``out``; return the report.

    Two stages, as BLIP-2's own recipe: representation learning of the vision tower and Q-Former
    (``blip2_stage1``), then generative learning of projector and language model on the train
    split's prompts with the vision side frozen."""
    torch.manual_seed(train.seed)
    tokenizer = train_tokenizer(tokenizer_corpus(world), spec.vocab_size)
    model = tiny_blip2_model(spec, world_spec.image_size, tokenizer.convert_tokens_to_ids(IMAGE),
                             tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    size = {"height": world_spec.image_size, "width": world_spec.image_size}
    backbone = Blip2Backbone(model, tokenizer, BlipImageProcessorPil(size=size), name="tiny_blip2",
                             pixel_cache_size=100_000)
    vision_side = [*model.vision_model.parameters(), *model.qformer.parameters(),
                   model.query_tokens]
    first = (lambda: blip2_stage1(backbone, world, stage1)) if stage1.steps else None
    report = two_stage_training(backbone, world, train, first, vision_side, progress)
    save_blip2(backbone, out)
    return report


def tiny_blip2_folder(cache_dir: str, world: dict | None = None, model: dict | None = None,
                      pretraining: dict | None = None, stage1: dict | None = None,
                      progress: bool = True, shipped: bool = True) -> Path:
    """The folder of the cached tiny BLIP-2 for these settings (HF layout): copied from the
    shipped builds when one answers to them (``shipped``), else built here (about 15 minutes on
    2 cores). Tiny MiniGPT-4 takes its vision tower and Q-Former from here."""
    world_spec = MiniWorldSpec(**(world or {}))
    spec = TinyBlip2Spec(**(model or {}))
    train = PretrainSpec(**(pretraining or {}))
    first = Stage1Spec(**(stage1 or {}))
    world_dir = ensure_miniworld(cache_dir, world_spec)
    folder, settings = build_folder(cache_dir, "tiny_blip2", RECIPE_VERSION, world_spec,
                                    {"model": asdict(spec), "pretraining": asdict(train),
                                     "stage1": asdict(first)})
    return cached_build(folder, lambda out: build_tiny_blip2(out, world_dir, world_spec, spec, train,
                                                             first, progress),
                        settings, shipped_root(shipped))


def tiny_blip2_build(cache_dir: str, world: dict | None = None, model: dict | None = None,
                     pretraining: dict | None = None, stage1: dict | None = None,
                     in_context: dict | None = None, progress: bool = True,
                     shipped: bool = True) -> Path:
    """The folder ``tiny_blip2`` loads: the base build, or its in-context stage when
    ``in_context`` turns it on (``mmke.backbones.tiny.context``), each shipped or built."""
    folder = tiny_blip2_folder(cache_dir, world, model, pretraining, stage1, progress, shipped)
    return in_context_folder(folder, in_context,
                             ensure_miniworld(cache_dir, MiniWorldSpec(**(world or {}))),
                             lambda f: load_blip2(str(f), device="cpu"), save_blip2, progress,
                             shipped)


def tiny_blip2(cache_dir: str, world: dict | None = None, model: dict | None = None,
               pretraining: dict | None = None, stage1: dict | None = None,
               in_context: dict | None = None, dtype: str = "float32", device: str = "auto",
               name: str = "tiny_blip2", progress: bool = True,
               shipped: bool = True) -> Blip2Backbone:
    """The cached tiny BLIP-2 for these settings, shipped or built if missing; ``in_context``:
    the settings of the in-context stage (``mmke.backbones.tiny.context``), off by default;
    ``shipped=False`` builds on this machine even where a shipped build answers."""
    folder = tiny_blip2_build(cache_dir, world, model, pretraining, stage1, in_context, progress,
                              shipped)
    return load_blip2(str(folder), dtype=dtype, device=device, name=name)
