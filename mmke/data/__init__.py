"""Edit records, the MMEdit loader and the embedded mini world."""

from mmke.data.record import EditRecord, LazyImage, Prompt

__all__ = ["EditRecord", "LazyImage", "Prompt"]
