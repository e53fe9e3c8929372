"""Qwen2-VL over ``transformers.Qwen2VLForConditionalGeneration`` (the Qwen/Qwen2-VL-7B-Instruct
layout): real loading and the adapter.

Prompt layout: the Instruct model's chat template for one user turn with the image first,
``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|>
<|image_pad|><|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n``; the target is the
assistant's answer and follows directly, and ``append_eos`` closes the turn with ``<|im_end|>``.
Text-only prompts (T-Loc) drop the vision block.

Qwen2-VL reads images at their own resolution: each picture is resized to a multiple of
``patch_size * merge_size`` within [min_pixels, max_pixels], cut into patches, and every
``merge_size x merge_size`` block of patches becomes one language token, so the number of image
tokens depends on the picture. The adapter processes each image once (cached by path) for its
flattened patches and ``image_grid_thw``, expands ``<|image_pad|>`` to that many tokens, builds
the joint embeddings itself (so image and text-only rows share one padded forward), and passes
the M-RoPE position ids explicitly, computed by the model's own ``get_rope_index`` per call: the
model's cached ``rope_deltas`` belong to whichever call ran last and are never relied on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import (AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmke.backbones.base import Backbone, EncodedPrompt, ModelBatch
from mmke.backbones.caches import TokenCache
from mmke.backbones.encoding import collate_left, distinct_images, encode_pair, expand_placeholder
from mmke.backbones.greedy import greedy_settings
from mmke.backbones.roles import LayerRoles
from mmke.backbones.weights import check_weights_path
from mmke.data.record import LazyImage, Prompt
from mmke.devices import resolve_device, resolve_dtype

_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QWEN2VL_PROMPT = (_SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}"
                  "<|im_end|>\n<|im_start|>assistant\n")
QWEN2VL_TEXT_PROMPT = _SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: The end of a chat turn: the Instruct tokenizer's eos, and what ``append_eos`` labels.
TURN_END = "<|im_end|>"


class PatchCache:
    """LRU of processed images by file path: (flattened patches [n_patches, patch_dim],
    grid_thw [3]). Qwen2-VL pictures differ in patch count, so they are kept apart, not stacked."""

    def __init__(self, process: Callable[[list[Image.Image]], tuple[torch.Tensor, torch.Tensor]],
                 capacity: int = 512) -> None:
        self._process = process
        self._capacity = capacity
        self._items: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, images: list[LazyImage]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        missing = [img for img in dict.fromkeys(images) if str(img.path) not in self._items]
        if missing:
            patches, grids = self._process([img.load() for img in missing])
            chunks = torch.split(patches, grids.prod(-1).tolist())
            for img, chunk, grid in zip(missing, chunks, grids):
                self._items[str(img.path)] = (chunk, grid)
        out = []
        for img in images:
            key = str(img.path)
            self._items.move_to_end(key)
            out.append(self._items[key])
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return out


class Qwen2VLBackbone(Backbone):
    """Adapter over a loaded Qwen2-VL model, its tokenizer and image processor.

    ``prompt_format`` must contain the image placeholder (``<|image_pad|>``) once;
    ``text_prompt_format`` is used for prompts without an image and must not contain it.
    """

    family = "qwen2vl"

    def __init__(self, model: Qwen2VLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 image_processor: Qwen2VLImageProcessorPil, prompt_format: str = QWEN2VL_PROMPT,
                 text_prompt_format: str = QWEN2VL_TEXT_PROMPT, name: str = "qwen2vl",
                 pixel_cache_size: int = 512) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        config = model.config
        self.image_token_id = int(config.image_token_id)
        placeholder = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if prompt_format.count(placeholder) != 1 or placeholder in text_prompt_format:
            raise ValueError(f"backbone.prompt_format must contain the image placeholder "
                             f"{placeholder!r} once and backbone.text_prompt_format none; got "
                             f"{prompt_format!r} and {text_prompt_format!r}")
        vision = config.vision_config
        processor_sizes = (image_processor.merge_size, image_processor.patch_size,
                           image_processor.temporal_patch_size)
        model_sizes = (vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size)
        if tuple(processor_sizes) != tuple(model_sizes):
            raise ValueError(f"the image processor's (merge, patch, temporal) sizes "
                             f"{processor_sizes} differ from the vision config's {model_sizes}")
        self.prompt_format = prompt_format
        self.text_prompt_format = text_prompt_format
        self.merge_size = int(vision.spatial_merge_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
        known = turn_end is not None and turn_end != tokenizer.unk_token_id
        self.end_id = turn_end if known else tokenizer.eos_token_id
        # generation stops at the end of the turn or at any end of text the checkpoint declares
        # (Qwen2-VL-7B-Instruct's generation config: <|im_end|> and <|endoftext|>)
        declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        declared = declared if isinstance(declared, list) else [declared]
        self._stop_ids = list(dict.fromkeys(
            t for t in (self.end_id, tokenizer.eos_token_id, *declared) if t is not None))
        inner = model.model
        self._modules = LayerRoles(inner.language_model.layers, ffn_in="mlp.up_proj",
                                   ffn_gate="mlp.gate_proj", ffn_out="mlp.down_proj",
                                   attention="self_attn", projector=inner.visual.merger,
                                   vision_tower=inner.visual)
        self._patches = PatchCache(self._process_images, pixel_cache_size)
        self._token_ids = TokenCache(tokenizer)

    @property
    def stop_ids(self) -> list[int]:
        return self._stop_ids

    def _process_images(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def patches(self, images: list[LazyImage]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each image's flattened patches [n_patches, patch_dim] and grid (t, h, w), by path."""
        return self._patches.get(images)

    def image_token_count(self, image: LazyImage) -> int:
        """Language tokens of this picture: its patches over merge_size² (one per merged block),
        which depends on the picture's size (dynamic resolution)."""
        return int(self.patches([image])[0][1].prod()) // self.merge_size ** 2

    def _split_target(self, text: str, target: str) -> tuple[list[int], list[int]]:
        """Prompt ids and target ids as the chat template renders them: the assistant's answer
        follows ``assistant\\n`` directly (no space, unlike ``encoding.split_target``'s join).
        Where the prompt's ids are not a prefix of the joint ids, the target is tokenized alone."""
        prompt_ids = self._token_ids(text)
        joint = self._token_ids(text + target)
        if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return prompt_ids, joint[len(prompt_ids):]
        return prompt_ids, self._token_ids(target)

    def encode(self, prompt: Prompt, append_eos: bool = False,
               with_target: bool = True) -> EncodedPrompt:
        fmt = self.prompt_format if prompt.image is not None else self.text_prompt_format
        text = fmt.format(prompt.text)
        if with_target:
            prompt_ids, target = self._split_target(text, prompt.target)
        else:
            prompt_ids, target = self._token_ids(text), []
        if append_eos and self.end_id is not None:
            target = target + [self.end_id]
        count = 0
        if prompt.image is not None:
            count = self.image_token_count(prompt.image)
            prompt_ids = expand_placeholder(prompt_ids, self.image_token_id, count)
        return encode_pair(prompt_ids, target, prompt.image, self.image_token_id, count,
                           where=f"{prompt.kind} prompt {text!r}")

    def collate(self, encoded: list[EncodedPrompt]) -> ModelBatch:
        """``pixel_values``: the distinct images' patches concatenated in distinct-image order;
        ``image_grid_thw``: their grids, [n_distinct, 3]."""
        images, index = distinct_images(encoded)
        pixel_values = grid = None
        if images:
            processed = self.patches(images)
            pixel_values = torch.cat([p for p, _ in processed])
            grid = torch.stack([g for _, g in processed])
        return collate_left(encoded, self.pad_id, self.image_token_id, pixel_values, index, grid)

    def merged_features(self, pixel_values: torch.Tensor,
                        image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Merged (projected) features of each image, [tokens_i, hidden] per image, in order
        (dynamic resolution: the token count differs per image)."""
        return self.model.model.get_image_features(pixel_values, image_grid_thw).pooler_output

    def image_rows(self, batch: ModelBatch) -> torch.Tensor:
        assert batch.pixel_values is not None and batch.image_grid_thw is not None
        features = self.merged_features(batch.pixel_values, batch.image_grid_thw)
        return torch.cat([features[i] for i in batch.image_index.tolist()])

    def position_ids(self, batch: ModelBatch) -> torch.Tensor:
        """M-RoPE positions [3, batch, seq] from the model's ``get_rope_index``: text tokens count
        up from 0 after the left padding, image tokens take (t, row, column) of their grid."""
        grid = None
        if batch.image_grid_thw is not None:
            grid = batch.image_grid_thw[batch.image_index.to(batch.image_grid_thw.device)]
        positions, _ = self.model.model.get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.image_token_mask.int(), image_grid_thw=grid,
            attention_mask=batch.attention_mask)
        return positions

    def forward_inputs(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        return {"position_ids": self.position_ids(batch)}

    def language_model_view(self) -> Qwen2ForCausalLM:
        """The text model and LM head as a standalone ``Qwen2ForCausalLM`` whose modules are the
        backbone's own (the shell is built on the meta device: nothing is allocated). It is
        called with 1-D positions, which the text model repeats over (t, h, w): Qwen2-VL's M-RoPE
        with equal positions is Qwen2's 1-D RoPE, so it scores text exactly as the backbone does,
        and its config is a ``Qwen2Config`` (``AutoModelForCausalLM.from_config`` builds a Qwen2
        of the same shape)."""
        text = self.model.config.text_config.to_dict()
        theta = (text.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        config = Qwen2Config(**{k: v for k, v in text.items()
                                if k not in ("model_type", "architectures", "rope_scaling",
                                             "rope_parameters", "transformers_version")},
                             rope_parameters={"rope_type": "default", "rope_theta": theta})
        with torch.device("meta"):
            lm = Qwen2ForCausalLM(config)
        lm.model = self.model.model.language_model
        lm.lm_head = self.model.lm_head
        return lm

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 16) -> list[str]:
        """Greedy decoding through the model's own ``generate`` (its M-RoPE bookkeeping included);
        each image row gets its image's patches and grid, as the HF processor would pass them."""
        encoded = [self.encode(p, with_target=False) for p in prompts]
        batch = self.collate(encoded).to(self.device, self.dtype)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "mm_token_type_ids": batch.image_token_mask.int()}
        if batch.pixel_values is not None:
            chunks = torch.split(batch.pixel_values, batch.image_grid_thw.prod(-1).tolist())
            index = batch.image_index.tolist()
            inputs["pixel_values"] = torch.cat([chunks[i] for i in index])
            inputs["image_grid_thw"] = batch.image_grid_thw[index]
        out = self.model.generate(**inputs,
                                  **greedy_settings(max_new_tokens, self.stop_ids, self.pad_id))
        new = out[:, batch.input_ids.shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def load_qwen2vl(path: str | None, dtype: str = "float32", device: str = "auto",
                 device_map: str | dict | None = None, prompt_format: str = QWEN2VL_PROMPT,
                 text_prompt_format: str = QWEN2VL_TEXT_PROMPT, min_pixels: int | None = None,
                 max_pixels: int | None = None, name: str = "qwen2vl",
                 local_files_only: bool = True) -> Qwen2VLBackbone:
    """Load Qwen2-VL weights (a local folder in the Qwen/Qwen2-VL-7B-Instruct layout, or a hub id
    when allowed) with its tokenizer and image processor. ``min_pixels`` / ``max_pixels`` override
    the processor's resize bounds (papers often cap ``max_pixels`` to bound image-token counts)."""
    source = check_weights_path(path, family="Qwen2-VL (e.g. Qwen/Qwen2-VL-7B-Instruct)",
                                local_files_only=local_files_only)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        source, dtype=resolve_dtype(dtype), device_map=device_map,
        local_files_only=local_files_only)
    if device_map is None:
        model = model.to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
              if v is not None}
    processor = Qwen2VLImageProcessorPil.from_pretrained(source, local_files_only=local_files_only,
                                                         **bounds)
    return Qwen2VLBackbone(model, tokenizer, processor, prompt_format=prompt_format,
                           text_prompt_format=text_prompt_format, name=name)


def save_qwen2vl(backbone: Qwen2VLBackbone, folder: Path) -> None:
    """Write model, tokenizer and image processor in the layout ``load_qwen2vl`` reads."""
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    backbone.image_processor.save_pretrained(folder)
