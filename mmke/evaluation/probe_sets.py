"""Loaders of probe sets (``eval.probes``): the mini world's MME-style sets and MME itself.

Questions are asked with the data source's VQA template (``templates.m_loc``, which wraps a VQA
question in both tasks), so an E-IC run asks its probes the way it asks multimodal locality.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mmke.data.miniworld.generate import PROBE_CATEGORIES
from mmke.data.prompts import PromptTemplates
from mmke.data.record import LazyImage, Prompt
from mmke.errors import ConfigError, DataError
from mmke.evaluation.probes import ProbeCategory, ProbeSet
from mmke.evaluation.spec import MetricSpec

#: MME's released layout (Fu et al., 2023): per category either ``images/`` beside
#: ``questions_answers_YN/``, or each image beside a same-named ``.txt``; each ``.txt`` holds one
#: ``question<TAB>Yes|No`` line per question (two per image).
MME_IMAGE_DIR = "images"
MME_QA_DIR = "questions_answers_YN"
MME_NESTED = "MME_Benchmark"  # some copies of the release keep the categories one folder down
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_probe_set(spec: MetricSpec, source: object, templates: PromptTemplates) -> ProbeSet | None:
    """The probe set ``spec`` asks for (None for ``eval.probes=none``), checked before any edit:
    a missing folder or file is an error naming the path and what to do."""
    if spec.probes == "none":
        return None
    limit = spec.probes_limit or None
    if spec.probes == "miniworld":
        root = getattr(source, "root", None)  # MiniWorldSource's generated folder
        if root is None or not (Path(root) / "probes").is_dir():
            raise ConfigError("eval.probes=miniworld needs the embedded mini world as data "
                              "(data=mini_vqa or data=mini_caption); on real data use "
                              "eval.probes=mme with eval.probes_root=<MME folder>")
        return miniworld_probes(Path(root), templates, spec.probes_categories, limit)
    assert spec.probes_root  # MetricSpec refuses probes=mme without it
    return mme_probes(Path(spec.probes_root), templates, spec.probes_categories, limit)


def miniworld_probes(root: Path, templates: PromptTemplates, categories: Sequence[str] = (),
                     limit: int | None = None) -> ProbeSet:
    """The mini world's ``probes/<category>.json`` (rows ``{image, question, answer, category}``,
    one question per picture)."""
    out = []
    for name in _chosen(categories, PROBE_CATEGORIES, "the mini world"):
        path = root / "probes" / f"{name}.json"
        if not path.is_file():
            raise DataError("probe file not found", file=str(path),
                            hint="delete the mini world folder so that it is generated again")
        rows = json.loads(path.read_text(encoding="utf-8"))[:limit]
        prompts = tuple(_prompt(templates, r["question"], r["answer"], root / r["image"],
                                f"{path}, row {i}") for i, r in enumerate(rows))
        out.append(ProbeCategory(name, prompts, tuple(r["image"] for r in rows)))
    return ProbeSet("miniworld", tuple(out))


def mme_probes(root: Path, templates: PromptTemplates, categories: Sequence[str] = (),
               limit: int | None = None) -> ProbeSet:
    """MME's released folder ``root`` (the categories as its subfolders, or under
    ``root/MME_Benchmark``). ``limit``: at most that many questions per category, whole images
    only (so accuracy+ stays defined), at least one image."""
    if not root.is_dir():
        raise DataError("MME folder not found", file=str(root),
                        hint="set eval.probes_root to the unpacked MME_Benchmark_release_version "
                             "folder (one folder per category: existence/, count/, OCR/, ...)")
    if (root / MME_NESTED).is_dir():
        root = root / MME_NESTED
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = []
    for name in _chosen(categories, tuple(found), f"MME folder {root}"):
        images = _mme_category(root / name)
        kept, n = [], 0
        for image, pairs in images:
            if kept and limit is not None and n + len(pairs) > limit:
                break
            kept.append((image, pairs))
            n += len(pairs)
        prompts = tuple(_prompt(templates, q, a, image, f"{txt}, line {i + 1}")
                        for image, pairs in kept for i, (q, a, txt) in enumerate(pairs))
        keys = tuple(image.name for image, pairs in kept for _ in pairs)
        out.append(ProbeCategory(name, prompts, keys))
    return ProbeSet("mme", tuple(out))


def _mme_category(folder: Path) -> list[tuple[Path, list[tuple[str, str, Path]]]]:
    """(image, [(question, answer, txt file)]) per image of one category, in file-name order."""
    split = (folder / MME_QA_DIR).is_dir()
    qa_dir = folder / MME_QA_DIR if split else folder
    image_dir = folder / MME_IMAGE_DIR if split else folder
    files = sorted(qa_dir.glob("*.txt"))
    if not files:
        raise DataError("MME category has no question files", file=str(qa_dir),
                        hint=f"expected {MME_IMAGE_DIR}/ and {MME_QA_DIR}/ with one .txt per "
                             "image, or each image beside a same-named .txt; choose categories "
                             "with eval.probes_categories")
    out = []
    for txt in files:
        image = next((image_dir / f"{txt.stem}{s}" for s in IMAGE_SUFFIXES
                      if (image_dir / f"{txt.stem}{s}").is_file()), None)
        if image is None:
            raise DataError(f"no image {txt.stem}{{{','.join(IMAGE_SUFFIXES)}}} in {image_dir}",
                            file=str(txt))
        pairs = []
        for i, line in enumerate(txt.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            question, sep, answer = line.rstrip("\r").rpartition("\t")
            if not sep or not question.strip() or not answer.strip():
                raise DataError("expected 'question<TAB>answer'", file=str(txt), index=i)
            pairs.append((question.strip(), answer.strip(), txt))
        out.append((image, pairs))
    return out


def _chosen(categories: Sequence[str], available: Sequence[str], where: str) -> list[str]:
    """``categories`` (all ``available`` when empty), each checked against ``available``."""
    unknown = [c for c in categories if c not in available]
    if unknown:
        raise ConfigError(f"eval.probes_categories: {unknown} not in {where}; available: "
                          f"{list(available)}")
    return list(categories) or list(available)


def _prompt(templates: PromptTemplates, question: str, answer: str, image: Path,
            where: str) -> Prompt:
    return Prompt(templates.m_loc.format(question), answer, LazyImage(image, where), "probe")
