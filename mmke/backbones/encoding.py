"""Family-independent pieces of turning prompts into padded tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmke.backbones.base import IGNORE_INDEX, EncodedPrompt, ModelBatch
from mmke.data.record import LazyImage


def encode_pair(prefix_ids: list[int], target_ids: list[int], image: LazyImage | None,
                image_token_id: int, expected_image_tokens: int, where: str) -> EncodedPrompt:
    """Join prompt and target ids, label only the target, and check the image-token count.

    The check exists because BLIP-2 (and others) silently ignore an image whose placeholder count
    is wrong; here that is an error, naming the prompt.
    """
    ids = prefix_ids + target_ids
    count = sum(1 for t in ids if t == image_token_id)
    wanted = expected_image_tokens if image is not None else 0
    if count != wanted:
        raise ValueError(f"{where}: {count} image tokens in the prompt, expected {wanted}; "
                         "the prompt text must not contain the image placeholder itself")
    labels = [IGNORE_INDEX] * len(prefix_ids) + list(target_ids)
    return EncodedPrompt(tuple(ids), tuple(labels), image)


def distinct_images(encoded: list[EncodedPrompt]) -> tuple[list[LazyImage], list[int]]:
    """The distinct images of a batch, in first-seen order, and each image row's index into them."""
    order: dict[LazyImage, int] = {}
    index = [order.setdefault(e.image, len(order)) for e in encoded if e.image is not None]
    return list(order), index


def expand_placeholder(ids: list[int], placeholder_id: int, count: int) -> list[int]:
    """Replace the single image placeholder of a tokenized prompt by ``count`` copies, as the HF
    processors of LLaVA and Qwen2-VL do before tokenization (one placeholder per image)."""
    out: list[int] = []
    for t in ids:
        out.extend([placeholder_id] * count if t == placeholder_id else [t])
    return out


def split_target(tokenize: Callable[[str], list[int]], prompt_text: str,
                 target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt_text`` and of its target, tokenized together as the model reads them.

    SentencePiece tokenizers (Llama, Vicuna) merge a leading space differently when a piece is
    tokenized alone, so the target is the tail of ``prompt + " " + target`` beyond the prompt's own
    ids. Where the prompt's ids are not a prefix of the joint ids (a merge across the seam), the
    target is tokenized alone.
    """
    prompt_ids = tokenize(prompt_text)
    joint = tokenize(f"{prompt_text} {target}")
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return prompt_ids, joint[len(prompt_ids):]
    return prompt_ids, tokenize(" " + target)


def collate_left(encoded: list[EncodedPrompt], pad_id: int, image_token_id: int,
                 pixel_values: torch.Tensor | None, image_index: list[int],
                 image_grid_thw: torch.Tensor | None = None) -> ModelBatch:
    """Pad on the left (decoder-only generation and scoring share one layout)."""
    length = max(len(e.input_ids) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    for row, e in enumerate(encoded):
        start = length - len(e.input_ids)
        input_ids[row, start:] = torch.tensor(e.input_ids)
        labels[row, start:] = torch.tensor(e.labels)
        attention[row, start:] = 1
    return ModelBatch(input_ids=input_ids, attention_mask=attention, labels=labels,
                      image_token_mask=(input_ids == image_token_id) & attention.bool(),
                      pixel_values=pixel_values,
                      image_index=torch.tensor(image_index, dtype=torch.long),
                      image_grid_thw=image_grid_thw)
