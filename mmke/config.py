"""Building objects from config nodes, with mmke's own errors kept as they are."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmke.errors import MMKEError


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but an ``MMKEError`` raised by the target (missing weights,
    a bad data file) comes out unwrapped, so the user sees its message, not Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, MMKEError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
