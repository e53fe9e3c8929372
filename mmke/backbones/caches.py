"""Small per-backbone caches: preprocessed images by file path, token ids by text."""

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


class TokenCache:
    """LRU of token ids by text: evaluation tokenizes the same strings again and again (the
    locality prompts before and after every edit, the edit question for Rel and M-Gen)."""

    def __init__(self, tokenizer, capacity: int = 8192) -> None:
        self._tokenizer = tokenizer
        self._capacity = capacity
        self._items: OrderedDict[str, list[int]] = OrderedDict()

    def __call__(self, text: str) -> list[int]:
        ids = self._items.get(text)
        if ids is None:
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            self._items[text] = ids
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(text)
        return list(ids)
