"""The tiny Qwen2-VL: a small Qwen2-VL vision transformer with its patch merger, and a small
Qwen2-VL language model with M-RoPE, all real transformers classes, pretrained on the mini world
and cached.

Geometry: 48-pixel pictures, 8-pixel patches, 2x2 merging, so each picture is a 6x6 patch grid
merged into 3x3 = 9 image tokens, one per cell of the mini world's 3x3 grid (row-major, as the
processor and the merger lay them out).

Stage 1 (``qwen2vl_stage1``) stands in for Qwen's own ViT pretraining: it trains the whole visual
model, merger included, so that every image token describes its column of the picture. Stage 2
trains the language model on the train split's prompts with the whole visual model frozen, the
merger (Qwen2-VL's vision-language projector) included. Unlike a fresh LLaVA projector, the merger
is part of what stage 1 learnt, and training it at the language model's learning rate washes out
the subtler features (size, column): measured at 4 epochs of stage 2 after a column-mean stage 1,
85.0% of the eval questions answered with the merger frozen against 78.8% with it training (62%
with the ViT training too). Loaded back through ``load_qwen2vl``, the code path of real weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLTextConfig,
                          Qwen2VLVisionConfig)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmke.backbones.qwen2vl import (QWEN2VL_PROMPT, QWEN2VL_TEXT_PROMPT, TURN_END, Qwen2VLBackbone,
                                    load_qwen2vl, save_qwen2vl)
from mmke.backbones.tiny.builder import build_folder, cached_build, shipped_root
from mmke.backbones.tiny.context import in_context_folder
from mmke.backbones.tiny.corpus import tokenizer_corpus
from mmke.backbones.tiny.pretrain import PretrainSpec
from mmke.backbones.tiny.recipe import fan_in_init, two_stage_training
from mmke.backbones.tiny.stage1 import Stage1Spec, representation_stage, token_of_each_column
from mmke.backbones.tiny.tokenizer import train_tokenizer
from mmke.data.miniworld.generate import MiniWorldSpec, ensure_miniworld
from mmke.data.prompts import VQA_TEMPLATE
from mmke.data.record import LazyImage

# Bump when the build recipe changes for the same settings, so caches are rebuilt.
RECIPE_VERSION = 2

#: Qwen's chat and vision markers, kept whole by the tiny tokenizer (the real vocabulary has them)
QWEN_MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
#: the chat template occurs in every prompt and the VQA template in most: weigh both in the
#: tokenizer's corpus so their words become single tokens and sequences stay short
TEMPLATE_WEIGHT = 200


@dataclass(frozen=True)
class TinyQwen2VLSpec:
    vocab_size: int = 640
    patch_size: int = 8  # 48 px -> 6x6 patches
    merge_size: int = 2  # 2x2 patches per image token -> 3x3 tokens: one per cell of the world
    temporal_patch_size: int = 2  # a still image is repeated over Qwen's two frames
    vision_embed: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_ffn: int = 344  # 8/3 x hidden, as a multiple of 8
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention, as Qwen2-VL-7B (28 query / 4 key-value heads)
    max_positions: int = 512


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary half-dimension into (temporal, height, width) sections:
    [16, 24, 24] of 64 in the real model, scaled to ``head_dim / 2`` (they must sum to it)."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_qwen2vl_model(spec: TinyQwen2VLSpec, image_token_id: int, video_token_id: int,
                       vision_start_id: int, vision_end_id: int, pad_id: int,
                       eos_id: int) -> Qwen2VLForConditionalGeneration:
    """A randomly initialised Qwen2VLForConditionalGeneration of the given size."""
    head_dim = spec.text_hidden // spec.heads
    text = Qwen2VLTextConfig(vocab_size=spec.vocab_size, hidden_size=spec.text_hidden,
                             intermediate_size=spec.text_ffn, num_hidden_layers=spec.text_layers,
                             num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                             max_position_embeddings=spec.max_positions,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": mrope_section(head_dim)},
                             pad_token_id=pad_id, bos_token_id=None, eos_token_id=eos_id)
    vision = Qwen2VLVisionConfig(depth=spec.vision_layers, embed_dim=spec.vision_embed,
                                 num_heads=spec.vision_heads, hidden_size=spec.text_hidden,
                                 patch_size=spec.patch_size, spatial_merge_size=spec.merge_size,
                                 temporal_patch_size=spec.temporal_patch_size)
    config = Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                           image_token_id=image_token_id, video_token_id=video_token_id,
                           vision_start_token_id=vision_start_id, vision_end_token_id=vision_end_id,
                           tie_word_embeddings=False)
    model = Qwen2VLForConditionalGeneration(config)
    visual = model.model.visual
    with torch.no_grad():  # see fan_in_init: keep the image signal alive from scratch
        fan_in_init(visual, 1.0)
        fan_in_init(visual.merger, 0.1)
        conv = visual.patch_embed.proj.weight  # a Conv3d, which fan_in_init leaves alone
        conv.normal_(0.0, conv[0].numel() ** -0.5)
    return model


def tiny_image_processor(spec: TinyQwen2VLSpec, image_size: int) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's processor with the tiny patch geometry; min and max pixels are the world's
    picture area, so world pictures keep their size and others are resized to about that area."""
    return Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=spec.merge_size,
                                    temporal_patch_size=spec.temporal_patch_size,
                                    min_pixels=image_size ** 2, max_pixels=image_size ** 2)


def qwen2vl_stage1(backbone: Qwen2VLBackbone, world: Path, spec: Stage1Spec) -> dict[str, float]:
    """Stand-in for Qwen's ViT pretraining, on the merger's output (the image tokens, row-major
    over the merged grid): every image token describes the column of the picture it lies in
    (``token_of_each_column``)."""
    visual = backbone.model.model.visual
    hidden = backbone.model.config.vision_config.hidden_size
    grids: set[tuple[int, ...]] = set()

    def stacked(images: list[LazyImage]) -> torch.Tensor:
        """[n, n_patches, patch_dim]; the world's pictures share one grid."""
        processed = backbone.patches(images)
        grids.update(tuple(g.tolist()) for _, g in processed)
        if len(grids) != 1:
            raise ValueError(f"stage 1 needs pictures of one size, got patch grids {sorted(grids)}")
        return torch.stack([p for p, _ in processed])

    def column_states(pixel_values: torch.Tensor) -> torch.Tensor:
        (grid,) = grids
        n = pixel_values.shape[0]
        thw = torch.tensor(grid).expand(n, 3)
        merged = visual(pixel_values.flatten(0, 1), grid_thw=thw).pooler_output
        return token_of_each_column(merged.view(n, -1, hidden), rows=grid[1] // backbone.merge_size)

    return representation_stage(column_states, list(visual.parameters()), hidden, backbone.model,
                                stacked, world, spec)


def build_tiny_qwen2vl(out: Path, world: Path, world_spec: MiniWorldSpec, spec: TinyQwen2VLSpec,
                       train: PretrainSpec, stage1: Stage1Spec, progress: bool = True) -> dict:
    """Train tokenizer and model on ``world`` and save both into ``out``; return the report."""
    torch.manual_seed(train.seed)
    templates = [QWEN2VL_PROMPT.format(VQA_TEMPLATE.format("")), QWEN2VL_TEXT_PROMPT.format("")]
    corpus = [*tokenizer_corpus(world), *templates * TEMPLATE_WEIGHT]
    tokenizer = train_tokenizer(corpus, spec.vocab_size, extra_special=QWEN_MARKERS)
    tokenizer.eos_token = TURN_END  # as the Instruct tokenizer: the end of a turn ends the text
    ids = {m: tokenizer.convert_tokens_to_ids(m) for m in QWEN_MARKERS}
    model = tiny_qwen2vl_model(spec, ids["<|image_pad|>"], ids["<|video_pad|>"],
                               ids["<|vision_start|>"], ids["<|vision_end|>"],
                               tokenizer.pad_token_id, ids[TURN_END])
    backbone = Qwen2VLBackbone(model, tokenizer, tiny_image_processor(spec, world_spec.image_size),
                               name="tiny_qwen2vl", pixel_cache_size=100_000)
    # stage 2 freezes the whole visual model, merger (the projector) included; see the module doc
    visual = list(model.model.visual.parameters())
    first = (lambda: qwen2vl_stage1(backbone, world, stage1)) if stage1.steps else None
    report = two_stage_training(backbone, world, train, first, visual, progress)
    save_qwen2vl(backbone, out)
    return report


def tiny_qwen2vl_build(cache_dir: str, world: dict | None = None, model: dict | None = None,
                       pretraining: dict | None = None, stage1: dict | None = None,
                       in_context: dict | None = None, progress: bool = True,
                       shipped: bool = True) -> Path:
    """The folder ``tiny_qwen2vl`` loads: the base build, or its in-context stage when
    ``in_context`` turns it on (``mmke.backbones.tiny.context``), each shipped or built."""
    world_spec = MiniWorldSpec(**(world or {}))
    spec = TinyQwen2VLSpec(**(model or {}))
    train = PretrainSpec(**(pretraining or {}))
    first = Stage1Spec(**(stage1 or {}))
    world_dir = ensure_miniworld(cache_dir, world_spec)
    folder, settings = build_folder(cache_dir, "tiny_qwen2vl", RECIPE_VERSION, world_spec,
                                    {"model": asdict(spec), "pretraining": asdict(train),
                                     "stage1": asdict(first)})
    cached_build(folder, lambda out: build_tiny_qwen2vl(out, world_dir, world_spec, spec, train,
                                                        first, progress),
                 settings, shipped_root(shipped))
    return in_context_folder(folder, in_context, world_dir,
                             lambda f: load_qwen2vl(str(f), device="cpu"), save_qwen2vl,
                             progress, shipped)


def tiny_qwen2vl(cache_dir: str, world: dict | None = None, model: dict | None = None,
                 pretraining: dict | None = None, stage1: dict | None = None,
                 in_context: dict | None = None, dtype: str = "float32", device: str = "auto",
                 name: str = "tiny_qwen2vl", progress: bool = True,
                 shipped: bool = True) -> Qwen2VLBackbone:
    """The cached tiny Qwen2-VL for these settings, shipped or built on first use if
    missing; ``in_context``: the in-context stage's settings (``mmke.backbones.tiny.context``),
    off by default; ``shipped=False`` builds on this machine even where a shipped build answers."""
    folder = tiny_qwen2vl_build(cache_dir, world, model, pretraining, stage1, in_context, progress,
                                shipped)
    return load_qwen2vl(str(folder), dtype=dtype, device=device, name=name)
