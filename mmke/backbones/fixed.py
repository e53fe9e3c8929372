"""Families whose every picture takes the same number of image tokens (BLIP-2, MiniGPT-4, LLaVA):
one processed pixel tensor per distinct picture, cached by path."""

from __future__ import annotations

from typing import Any

import torch

from mmke.backbones.base import Backbone, EncodedPrompt, ModelBatch
from mmke.backbones.caches import PixelCache
from mmke.backbones.encoding import collate_left, distinct_images
from mmke.data.record import LazyImage


class FixedImageTokens(Backbone):
    """A ``Backbone`` with ``num_image_tokens`` tokens per picture and a pixel cache; the
    adapter sets ``image_processor``, ``num_image_tokens`` and ``_pixels``."""

    image_processor: Any
    num_image_tokens: int
    _pixels: PixelCache

    def image_token_count(self, image: LazyImage) -> int:
        return self.num_image_tokens

    def _process_images(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def pixels(self, images: list[LazyImage]) -> torch.Tensor:
        """Processed pixel values of ``images`` (cached by path), [n, channels, height, width]."""
        return self._pixels.get(images)

    def collate(self, encoded: list[EncodedPrompt]) -> ModelBatch:
        """Pad encoded prompts (left); each distinct picture's pixels once, ``image_index`` per row."""
        images, index = distinct_images(encoded)
        pixels = self.pixels(images) if images else None
        return collate_left(encoded, self.pad_id, self.image_token_id, pixels, index)
