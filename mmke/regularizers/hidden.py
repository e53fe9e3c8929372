"""Small helpers shared by the regularizers: where a prompt ends, and batched extra forwards."""

from __future__ import annotations

import torch

from mmke.backbones.base import IGNORE_INDEX, ModelBatch


def last_prompt_positions(batch: ModelBatch) -> torch.Tensor:
    """Per row, the position of the last prompt token: the one whose logits predict the first
    target token (the "last hidden state" of the prompt, before any target token is read)."""
    labelled = batch.labels != IGNORE_INDEX
    if not bool(labelled.any(dim=1).all()):
        raise ValueError("every row needs a target to locate the end of its prompt")
    return labelled.int().argmax(dim=1) - 1


def states_at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T, d) states at one position per row -> (B, d)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]


def tile_rows(batch: ModelBatch, n: int) -> ModelBatch:
    """The batch stacked ``n`` times (copy-major: rows 0..B-1 of copy 0, then of copy 1, ...),
    its images shared: one forward over n variants of every row, in the order of a
    ``(n, B, ...)`` tensor reshaped to ``(n*B, ...)``."""
    def tile(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(n, *([1] * (t.dim() - 1)))
    return ModelBatch(input_ids=tile(batch.input_ids), attention_mask=tile(batch.attention_mask),
                      labels=tile(batch.labels), image_token_mask=tile(batch.image_token_mask),
                      pixel_values=batch.pixel_values, image_index=tile(batch.image_index),
                      image_grid_thw=batch.image_grid_thw)
