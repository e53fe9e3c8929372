"""Which runs belong to a row of a paper's table.

A published row is keyed by backbone, task, editor, reg, protocol, T and setting. A run matches
when, for every key the row fills in:

- backbone: the run's backbone *family* equals it (``tiny_blip2`` -> ``blip2``; see
  :func:`backbone_family`); whether the run used a tiny model is reported beside the numbers;
- task: ``data.task`` of the run (older configs: guessed from ``data.name``);
- editor, reg: equal after :func:`norm_name` (``FT-L`` = ``ft_l`` = ``ftl``); an empty reg is
  ``none``;
- protocol and T: equal after :func:`protocol_key`, which treats single editing and a
  sequence of T=1 as the same thing; an empty protocol is ``single``;
- setting: each ``name=value`` is found in the run's config under the keys
  ``mmke.tables.papers.setting_keys`` gives and compares equal (numbers numerically, text
  case-insensitively). Settings the row does not name but the paper has a default for
  (``PaperSpec.defaults``) must equal that default in runs that have the key;
- the paper's metric definitions: ``PaperSpec.requires`` (e.g. ``eval.locality=kl`` for
  M-ORE) must hold in runs whose config has the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mmke.tables.papers import PAPERS, setting_keys
from mmke.tables.runs import config_value

#: Backbone names (after removing a ``tiny_`` prefix and normalising) -> the papers' family.
BACKBONE_FAMILIES: dict[str, str] = {
    "blip2": "blip2", "blip2opt": "blip2", "blip2opt27b": "blip2",
    "minigpt4": "minigpt4", "minigpt": "minigpt4",
    "llava": "llava", "llava15": "llava", "llavav15": "llava", "llava157b": "llava",
    "qwen2vl": "qwen2vl", "qwen2vl7b": "qwen2vl",
}
TINY_PREFIX = "tiny_"


def norm_name(value: Any) -> str:
    """Lower case, letters and digits only; missing values give ``""``."""
    if _blank(value):
        return ""
    return re.sub(r"[^0-9a-z]", "", str(value).lower())


def backbone_family(name: Any) -> str:
    """The papers' backbone family of a run's ``backbone.name`` (unknown names pass through
    normalised)."""
    text = "" if _blank(name) else str(name).lower()
    if text.startswith(TINY_PREFIX):
        text = text[len(TINY_PREFIX):]
    key = norm_name(text)
    return BACKBONE_FAMILIES.get(key, key)


def is_tiny(name: Any) -> bool:
    """Whether a backbone name is one of the embedded tiny models."""
    return not _blank(name) and str(name).lower().startswith(TINY_PREFIX)


def run_task(run: Mapping[str, Any]) -> str:
    """The run's task (``vqa``/``caption``): ``data.task``, else guessed from ``data.name``."""
    task = run.get("task")
    if not _blank(task):
        return str(task).lower()
    name = str(run.get("config.data.name") or "").lower()
    return "caption" if "caption" in name else "vqa" if "vqa" in name else ""


def protocol_key(protocol: Any, T: Any) -> tuple[str, int | None]:
    """(protocol, T) in a comparable form: single editing and sequential T=1 are one thing."""
    name = norm_name(protocol) or "single"
    t = None if _blank(T) else int(T)
    if name == "single" or (name == "sequential" and t == 1):
        return "single", 1
    return name, t


def parse_setting(text: Any) -> dict[str, str]:
    """``"lambda=0.1;rank=8"`` -> ``{"lambda": "0.1", "rank": "8"}`` (empty -> ``{}``)."""
    out: dict[str, str] = {}
    if _blank(text):
        return out
    for part in str(text).split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"setting {text!r}: {part!r} is not name=value")
        out[name.strip()] = value.strip()
    return out


def same_value(run_value: Any, wanted: str) -> bool:
    """A config value equals a published setting value: numerically when both are numbers
    (``1e-3`` = ``0.001``), as booleans for true/false, else as case-insensitive text."""
    a, b = _as_number(run_value), _as_number(wanted)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return str(run_value).strip().lower() == str(wanted).strip().lower()


@dataclass(frozen=True)
class RowKey:
    """The identity of one published row (empty strings and None mean "any")."""

    paper: str
    backbone: str = ""
    task: str = ""
    editor: str = ""
    reg: str = ""
    protocol: str = ""
    T: int | None = None
    setting: str = ""

    @classmethod
    def from_row(cls, paper: str, row: Mapping[str, Any]) -> RowKey:
        """The key of a published-CSV row."""
        T = row.get("T")
        return cls(paper=paper, backbone=_text(row.get("backbone")), task=_text(row.get("task")),
                   editor=_text(row.get("editor")), reg=_text(row.get("reg")),
                   protocol=_text(row.get("protocol")), T=None if _blank(T) else int(T),
                   setting=_text(row.get("setting")))

    def settings(self) -> dict[str, str]:
        """The row's settings as a mapping."""
        return parse_setting(self.setting)

    def matches(self, run: Mapping[str, Any], *, with_defaults: bool = True,
                with_requires: bool = True) -> bool:
        """Whether ``run`` (a runs-frame row) belongs to this row."""
        if self.backbone and backbone_family(run.get("backbone")) != norm_name(self.backbone):
            return False
        if self.task and run_task(run) != self.task.lower():
            return False
        if self.editor and norm_name(run.get("editor")) != norm_name(self.editor):
            return False
        if (norm_name(run.get("reg")) or "none") != (norm_name(self.reg) or "none"):
            return False
        if not self._protocol_matches(run):
            return False
        if with_requires and not self._requires_match(run):
            return False
        return self._settings_match(run, with_defaults)

    def select(self, runs: pd.DataFrame, *, with_defaults: bool = True,
               with_requires: bool = True) -> pd.DataFrame:
        """The rows of ``runs`` that match."""
        if runs.empty:
            return runs
        mask = [self.matches(row, with_defaults=with_defaults, with_requires=with_requires)
                for _, row in runs.iterrows()]
        return runs[mask]

    def baseline(self) -> RowKey:
        """The same row without its regularizer (and the regularizer's settings): the runs a
        significance test pairs with."""
        kept = {k: v for k, v in self.settings().items()
                if not all(key.startswith("reg.") for key in setting_keys(self.paper, k))}
        return RowKey(self.paper, self.backbone, self.task, self.editor, "none", self.protocol,
                      self.T, ";".join(f"{k}={v}" for k, v in kept.items()))

    def _protocol_matches(self, run: Mapping[str, Any]) -> bool:
        want_name, want_T = protocol_key(self.protocol, self.T)
        have_name, have_T = protocol_key(run.get("protocol"), run.get("T"))
        if want_name != have_name:
            return False
        return want_T is None or want_T == have_T

    def _requires_match(self, run: Mapping[str, Any]) -> bool:
        spec = PAPERS.get(self.paper)
        for key, wanted in (spec.requires.items() if spec is not None else ()):
            value = config_value(run, (key,))
            if value is not None and not same_value(value, wanted):
                return False
        return True

    def _settings_match(self, run: Mapping[str, Any], with_defaults: bool) -> bool:
        named = self.settings()
        for name, wanted in named.items():
            value = config_value(run, setting_keys(self.paper, name))
            if value is None or not same_value(value, wanted):
                return False
        spec = PAPERS.get(self.paper)
        if with_defaults and spec is not None:
            for name, default in spec.defaults.items():
                if name in named:
                    continue
                value = config_value(run, setting_keys(self.paper, name))
                if value is not None and not same_value(value, default):
                    return False
        return True


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return 1.0 if text == "true" else 0.0
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str:
    return "" if _blank(value) else str(value).strip()


def _blank(value: Any) -> bool:
    if value is None:
        return True
    try:
        if pd.isna(value):
            return True
    except (TypeError, ValueError):
        return False
    return isinstance(value, str) and not value.strip()
