"""Typed MMEdit records, lazily loaded images, and the prompts built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mmke.errors import DataError


@dataclass(frozen=True)
class LazyImage:
    """A path to an image, opened only when a batch needs its pixels."""

    path: Path
    source: str = ""  # "file, record, field" for error messages

    def load(self) -> Image.Image:
        if not self.path.is_file():
            raise DataError(
                f"image not found: {self.path}",
                hint="set data.root to the folder holding the MMEdit images (COCO val2014 and "
                "val2014_image_rephrase), or check the path in the annotation file"
                + (f" ({self.source})" if self.source else ""),
            )
        with Image.open(self.path) as img:
            return img.convert("RGB")


@dataclass(frozen=True)
class EditRecord:
    """One MMEdit row (Cheng et al., 2023). Field names follow the JSON schema exactly.

    ``src`` is the edit question (E-VQA) or caption prompt (E-IC), ``pred`` the unedited model's
    answer recorded by the benchmark, ``alt`` the new target, ``rephrase`` the text rephrase,
    ``image_rephrase`` the re-rendered image, ``loc``/``loc_ans`` the text-locality pair and
    ``m_loc``/``m_loc_q``/``m_loc_a`` the multimodal-locality triple. ``image`` and
    ``image_rephrase`` are None only in a text-only edit request (VLKEB's second edit,
    ``mmke.data.prompts.port_edit_requests``); a loaded record always has both.
    """

    src: str
    pred: str
    alt: str
    rephrase: str
    image: LazyImage | None
    image_rephrase: LazyImage | None
    loc: str
    loc_ans: str
    m_loc: LazyImage
    m_loc_q: str
    m_loc_a: str
    task: Literal["vqa", "caption"] = "vqa"
    uid: str = ""
    extras: dict[str, Any] = field(default_factory=dict)


# "port": VLKEB one-hop portability; "loc_*": DE-VQA's locality sets (see mmke.data.prompts);
# "probe": a general-capability probe (mmke.evaluation.probes).
PromptKind = Literal["rel", "t_gen", "m_gen", "t_loc", "m_loc", "orig", "port",
                     "loc_same_image", "loc_similar_image", "loc_no_image", "probe"]


@dataclass(frozen=True)
class Prompt:
    """One model input: optional image, the full prompt text (template applied), and a target.

    The target is scored teacher-forced; only its tokens are labelled.
    """

    text: str
    target: str
    image: LazyImage | None = None
    kind: PromptKind = "rel"
