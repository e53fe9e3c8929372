"""Data sources as Hydra builds them: real MMEdit or VLKEB under ``data.root``, or the embedded
mini world."""

from __future__ import annotations

from pathlib import Path

from mmke.data.miniworld.generate import ANNOTATION_FILES, MiniWorldSpec, ensure_miniworld
from mmke.data.miniworld.heldout import HELDOUT_FILES
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


# VLKEB's released folder (README of VLKEB/VLKEB): the annotation files at the top, the images in
# VLKEB_images/<entity id>/<file>.jpg, which is what the records' image paths are relative to.
VLKEB_IMAGE_DIR = "VLKEB_images"


def vlkeb(root: str | None, train_file: str, eval_file: str, annotation_dir: str | None = None,
          image_root: str | None = None, edit_template: str = "{}", m_loc_template: str = "{}",
          name: str = "") -> MMEditSource:
    """VLKEB (Huang et al., 2024) in its released layout: ``root/{train,eval,eval_edit_onehop}.json``
    and the images under ``root/VLKEB_images/``. ``annotation_dir`` and ``image_root`` override the
    two halves separately. The records are MMEdit-schema VQA rows; the one-hop file adds
    ``port_new`` (see ``mmke.data.prompts.portability_prompts``)."""
    if not root and not (annotation_dir and image_root):
        raise DataError(
            "data.root is not set",
            hint=f"point data.root at the VLKEB folder (train.json, eval.json and "
                 f"eval_edit_onehop.json beside {VLKEB_IMAGE_DIR}/ with the images), or set "
                 f"data.annotation_dir and data.image_root separately")
    base = Path(root) if root else Path()
    return MMEditSource(task="vqa", annotation_dir=annotation_dir or str(base),
                        image_root=image_root or str(base / VLKEB_IMAGE_DIR),
                        train_file=train_file, eval_file=eval_file, edit_template=edit_template,
                        m_loc_template=m_loc_template, name=name or "vlkeb")


class MiniWorldSource(MMEditSource):
    """The embedded mini world, generated into ``cache_dir`` on first use, then read back by the
    MMEdit loader like any real benchmark (one code path). ``heldout``: score on the held-out eval
    split (``mmke.data.miniworld.heldout``: rephrases and image rephrases pretraining never paired
    with the question, E-IC targets that describe other pictures); the train split is the same."""

    def __init__(self, cache_dir: str, task: str, world: dict | None = None, name: str = "",
                 heldout: bool = False) -> None:
        self.spec = MiniWorldSpec(**(world or {}))
        self.root = ensure_miniworld(cache_dir, self.spec)
        eval_file = HELDOUT_FILES[task] if heldout else ANNOTATION_FILES[(task, "eval")]
        default_name = f"mini_{task}_heldout" if heldout else f"mini_{task}"
        super().__init__(task=task, annotation_dir=str(self.root), image_root=str(self.root),
                         train_file=ANNOTATION_FILES[(task, "train")], eval_file=eval_file,
                         edit_template=_TEMPLATES[task], name=name or default_name)
