"""Reusing a loaded backbone for the next job that runs in the same process.

Hydra's basic launcher runs every job of a multirun in one process, one after another, and
joblib's loky workers each run job after job. Loading the backbone is the slowest part of a
small job (and minutes for real weights), so a process keeps what it loaded: one backbone per
device, keyed by the resolved backbone config and that device. A job asking for a different
backbone on the same device evicts the old one first.

Reuse must never let one job's edit leak into the next. Editors promise that ``restore()``
gives back bit-identical weights; the pool checks it anyway: a fingerprint of the model
(``mmke.sweep.fingerprint``) is taken right after loading and compared before every reuse,
and on any difference the backbone is dropped and loaded again (with a warning).
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmke.backbones.base import Backbone
from mmke.config import build
from mmke.sweep.fingerprint import Fingerprint, model_fingerprint

log = logging.getLogger(__name__)


@dataclass
class _Kept:
    key: str
    backbone: Backbone
    fingerprint: Fingerprint


class BackbonePool:
    """Backbones loaded by this process, at most one per device. ``loads`` counts the loads
    (a sweep of N jobs with one backbone config loads once per process)."""

    def __init__(self) -> None:
        self._kept: dict[str, _Kept] = {}  # device slot -> the backbone kept there
        self.loads = 0

    def get(self, node: DictConfig, overrides: Mapping[str, Any] | None = None
            ) -> tuple[Backbone, bool]:
        """The backbone ``node`` describes, built with keyword ``overrides`` (such as
        ``device``), and whether it was reused rather than loaded."""
        overrides = dict(overrides or {})
        resolved = dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
        key = json.dumps({**resolved, **overrides}, sort_keys=True, default=str)
        slot = str(overrides.get("device", resolved.get("device", "default")))
        kept = self._kept.pop(slot, None)
        if kept is not None and kept.key == key:
            if model_fingerprint(kept.backbone.model) == kept.fingerprint:
                self._kept[slot] = kept
                log.info("backbone %s: reused from the previous job (weights verified)",
                         _name(kept.backbone))
                return kept.backbone, True
            log.warning("backbone %s changed since it was loaded (an editor's restore() was "
                        "not exact, or it left a hook behind): loading it again",
                        _name(kept.backbone))
        if kept is not None:
            del kept  # free the old model before the new one is loaded
            gc.collect()
        backbone = build(node, **overrides)
        self.loads += 1
        self._kept[slot] = _Kept(key, backbone, model_fingerprint(backbone.model))
        return backbone, False

    def clear(self) -> None:
        """Drop every kept backbone."""
        self._kept.clear()
        gc.collect()


def _name(backbone: Backbone) -> str:
    return str(getattr(backbone, "name", type(backbone).__name__))


# The one pool of this process. Module-level on purpose: Hydra calls the task function once per
# job, and nothing else a job creates survives into the next job of the same process (a loky
# worker unpickles the task function anew for every job). The state is explicit in this object,
# keyed by everything that determines a backbone, and verified before each reuse.
PROCESS_BACKBONES = BackbonePool()
