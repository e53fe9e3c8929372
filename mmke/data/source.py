"""The data source Hydra instantiates for ``data=mmedit_vqa`` / ``data=mmedit_caption``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mmke.data.mmedit import TASKS, load_mmedit
from mmke.data.prompts import VQA_TEMPLATE, PromptTemplates
from mmke.data.record import EditRecord
from mmke.errors import ConfigError

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")


def _check_template(setting: str, template: str) -> None:
    """A template gets exactly one positional ``{}``; anything else breaks ``.format(text)``."""
    ok = template.count("{}") == 1
    if ok:
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError):  # e.g. "{0} {name}" or a stray brace
            ok = False
    if not ok:
        raise ConfigError(f"data.{setting} must contain exactly one '{{}}' (where the question or "
                          f"caption prompt goes) and no other braces; got {template!r}")


class MMEditSource:
    """MMEdit-format annotation files in ``annotation_dir``, images under ``image_root``.

    Generic over where the files live, so a generated benchmark (e.g. the mini world) can
    write the same format into a cache folder and reuse this class unchanged.
    """

    def __init__(self, task: str, annotation_dir: str, image_root: str, train_file: str,
                 eval_file: str, edit_template: str,
                 m_loc_template: str = VQA_TEMPLATE, t_loc_template: str = "{}",
                 name: str = "") -> None:
        if task not in TASKS:
            raise ConfigError(f"data.task must be one of {', '.join(TASKS)}; got {task!r}")
        for setting, template in (("edit_template", edit_template),
                                  ("m_loc_template", m_loc_template),
                                  ("t_loc_template", t_loc_template)):
            _check_template(setting, template)
        self._task: Literal["vqa", "caption"] = task  # type: ignore[assignment]  # checked above
        self._name = name or f"mmedit_{task}"
        self.annotation_dir = Path(annotation_dir)
        self.image_root = Path(image_root)
        self.files: dict[Split, str] = {"train": train_file, "eval": eval_file}
        self._templates = PromptTemplates(edit=edit_template, m_loc=m_loc_template,
                                          t_loc=t_loc_template)
        # split -> (limit it was loaded with, records); None means the whole file.
        self._cache: dict[str, tuple[int | None, list[EditRecord]]] = {}

    @property
    def task(self) -> Literal["vqa", "caption"]:
        return self._task

    @property
    def name(self) -> str:
        """The configured name, or ``mmedit_<task>`` when none is set."""
        return self._name

    @property
    def templates(self) -> PromptTemplates:
        return self._templates

    def path(self, split: Split) -> Path:
        """The annotation file of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.annotation_dir / self.files[split]

    def records(self, split: Split, limit: int | None = None) -> list[EditRecord]:
        """The first ``limit`` records (all when None) of ``split``, loaded once and cached.

        A cached load is reused whenever it covers the request; the result is a fresh list so
        callers may reorder or trim it without touching the cache.
        """
        path = self.path(split)
        cached = self._cache.get(split)
        if cached is not None:
            loaded_limit, recs = cached
            if loaded_limit is None or (limit is not None and limit <= loaded_limit):
                return recs[:limit]
        recs = load_mmedit(path, self.image_root, self._task, limit=limit)
        self._cache[split] = (limit, recs)
        return list(recs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self._name!r}, task={self._task!r}, "
                f"annotation_dir='{self.annotation_dir}', image_root='{self.image_root}')")
