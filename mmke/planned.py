"""Placeholders for the methods the papers' tables use that mmke does not implement yet.

A placeholder config (``conf/editor/mend.yaml``, ``conf/editor/unike.yaml``, ...) points its
``_target_`` here, so ``python run.py editor=mend`` composes, then stops with a message that
names the method, the tables that need it, and the options that do work (exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from mmke.errors import MMKEError

#: The config folder of this checkout (absent when mmke is installed without its configs).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
#: What a placeholder config's ``_target_`` reads; options with it are not "available".
TARGET = "mmke.planned.planned"


class NotImplementedMethodError(MMKEError):
    """A configured editor, regularizer or protocol exists only as a placeholder."""


def available_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Options of config group ``group`` that are implemented (not placeholders)."""
    folder = conf_dir / group
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml")
                  if TARGET not in p.read_text(encoding="utf-8"))


def planned(kind: str, name: str, paper: str, method: str = "", group: str | None = None,
            **_ignored: Any) -> NoReturn:
    """Raise: ``kind=name`` (e.g. ``editor=mend``) is a placeholder.

    ``paper`` says which tables need it, ``method`` the method's full name and citation,
    ``group`` the config folder (default: ``kind``). Every other keyword (the editor's
    ``regularizer``, the paper's hyperparameters kept in the YAML) is accepted and ignored.
    """
    group = group or kind
    what = f"{kind}={name}" + (f" ({method})" if method else "")
    options = available_options(group)
    text = (f"{what} is not implemented in mmke yet; it is needed by {paper}. "
            f"conf/{group}/{name}.yaml is a placeholder.")
    if options:
        text += f" Available {kind} options: {', '.join(options)}."
    raise NotImplementedMethodError(text)
