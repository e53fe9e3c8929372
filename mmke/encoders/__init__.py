"""Sentence encoders shared by the editors and regularizers that retrieve by text similarity
(ASAM's ``variants=simcse``, IKE's demonstrations, SERAC's scope classifier)."""

from mmke.encoders.cache import cached_encode, embedding_key
from mmke.encoders.retrieve import Neighbours, nearest
from mmke.encoders.sentence import SentenceEncoder

__all__ = ["Neighbours", "SentenceEncoder", "cached_encode", "embedding_key", "nearest"]
