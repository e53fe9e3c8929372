"""Data sources as Hydra builds them: real MMEdit under ``data.root``, or the embedded mini world."""

from __future__ import annotations

from pathlib import Path

from mmke.data.miniworld.generate import ANNOTATION_FILES, MiniWorldSpec, ensure_miniworld
from mmke.data.prompts import CAPTION_TEMPLATE, VQA_TEMPLATE
from mmke.data.source import MMEditSource
from mmke.errors import DataError

_TEMPLATES = {"vqa": VQA_TEMPLATE, "caption": CAPTION_TEMPLATE}


def mmedit(root: str | None, task: str, train_file: str, eval_file: str,
           annotation_dir: str | None = None, image_root: str | None = None,
           edit_template: str | None = None, name: str = "") -> MMEditSource:
    """Real MMEdit (Cheng et al., 2023) in its released layout: ``root/editing-data/<task>/*.json``
    and the images ``root/val2014/`` and ``root/val2014_image_rephrase/``. ``annotation_dir`` and
    ``image_root`` override the two halves separately."""
    if not root and not (annotation_dir and image_root):
        raise DataError(
            "data.root is not set",
            hint="point data.root at the MMEdit folder (editing-data/ with the JSON files, val2014/ "
                 "and val2014_image_rephrase/ with the images), or set data.annotation_dir and "
                 "data.image_root separately")
    base = Path(root) if root else Path()
    return MMEditSource(task=task,
                        annotation_dir=annotation_dir or str(base / "editing-data" / task),
                        image_root=image_root or str(base), train_file=train_file,
                        eval_file=eval_file, edit_template=edit_template or _TEMPLATES[task],
                        name=name)


class MiniWorldSource(MMEditSource):
    """The embedded mini world, generated into ``cache_dir`` on first use, then read back by the
    MMEdit loader like any real benchmark (one code path)."""

    def __init__(self, cache_dir: str, task: str, world: dict | None = None, name: str = "") -> None:
        self.spec = MiniWorldSpec(**(world or {}))
        self.root = ensure_miniworld(cache_dir, self.spec)
        super().__init__(task=task, annotation_dir=str(self.root), image_root=str(self.root),
                         train_file=ANNOTATION_FILES[(task, "train")],
                         eval_file=ANNOTATION_FILES[(task, "eval")],
                         edit_template=_TEMPLATES[task], name=name or f"mini_{task}")
