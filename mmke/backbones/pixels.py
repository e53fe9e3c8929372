"""A small per-backbone cache of preprocessed images, keyed by file path."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from PIL import Image

from mmke.data.record import LazyImage


class PixelCache:
    """LRU of pixel tensors: a record's image is scored by several prompts (rel, T-Gen) and
    many records share one locality image, so each file is decoded and processed once."""

    def __init__(self, process: Callable[[list[Image.Image]], torch.Tensor], capacity: int = 512):
        self._process = process
        self._capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, images: list[LazyImage]) -> torch.Tensor:
        """A [N, C, H, W] tensor of the images, in order."""
        missing = [img for img in dict.fromkeys(images) if str(img.path) not in self._items]
        if missing:
            processed = self._process([img.load() for img in missing])
            for img, tensor in zip(missing, processed):
                self._items[str(img.path)] = tensor
        out = []
        for img in images:
            key = str(img.path)
            self._items.move_to_end(key)
            out.append(self._items[key])
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return torch.stack(out)
