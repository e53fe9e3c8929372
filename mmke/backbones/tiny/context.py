"""The tiny recipes' in-context stage: what a real backbone's pretraining gives and the mini
world's corpus does not, a model that reads its context (IKE, UniKE's latent in-context vectors).

A tiny backbone pretrains on single questions and answers in 128-256 positions, so a fact put in
front of a question changes nothing and IKE would measure nothing. This stage continues from the
cached build: the context grows to ``max_positions`` (``Backbone.extend_context``), then the
language model trains on sequences in IKE's own format (``mmke.data.demonstrations``) built from
the TRAIN split only:
    [0..max_demos demonstrations] [the fact's copy line] "New Fact: {fact}\\nPrompt: {query}"
where the fact carries a train record's counterfactual target, and the query is, at random,
the fact's prompt, its paraphrase, its prompt on the re-rendered image (answered with the new
target: follow the fact), or its text or multimodal locality question (answered with the true
answer: ignore the fact). Demonstrations are drawn half from records asking the same question
(the contexts IKE's retrieval builds: similar facts with other answers, so only the last fact
counts) and half at random. A ``replay`` share of every batch is the recipe's own corpus
without context, so the knowledge the backbone had stays (its report is measured again after).
Only the language model trains; the vision side and the projector stay as built.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from mmke.backbones.base import Backbone, ModelBatch
from mmke.backbones.tiny.builder import cache_key, cached_build, read_report, shipped_root
from mmke.backbones.tiny.corpus import pretraining_prompts
from mmke.backbones.tiny.pretrain import train_on
from mmke.backbones.tiny.recipe import knowledge_of_world
from mmke.data.demonstrations import IKEFormat, demonstration_bank, edit_fact
from mmke.data.miniworld.generate import ANNOTATION_FILES
from mmke.data.mmedit import load_mmedit
from mmke.data.prompts import CAPTION_TEMPLATE, VQA_TEMPLATE, PromptTemplates
from mmke.data.record import EditRecord, Prompt
from mmke.errors import ConfigError

# Bump when the stage changes for the same settings, so cached folders are rebuilt.
CONTEXT_VERSION = 1

B = TypeVar("B", bound=Backbone)


@dataclass(frozen=True)
class ContextSpec:
    """Settings of the in-context stage (``backbone.in_context`` in ``conf/backbone/tiny_*``)."""

    enabled: bool = False
    max_positions: int = 512
    max_demos: int = 4
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 100
    replay: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"backbone.in_context.replay={self.replay} must be in [0, 1)")
        if self.max_demos < 0 or self.steps < 1 or self.batch_size < 1:
            raise ConfigError("backbone.in_context: max_demos >= 0, steps >= 1 and "
                              "batch_size >= 1 are needed")


@dataclass(frozen=True)
class _Task:
    records: list[EditRecord]
    templates: PromptTemplates
    demos: list[str]
    same_question: dict[str, list[int]]  # src -> record indices asking it


def _tasks(world: Path, fmt: IKEFormat) -> list[_Task]:
    tasks = []
    for task, template in (("vqa", VQA_TEMPLATE), ("caption", CAPTION_TEMPLATE)):
        records = load_mmedit(world / ANNOTATION_FILES[(task, "train")], world, task)
        templates = PromptTemplates(edit=template)
        by_src: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            by_src[r.src].append(i)
        tasks.append(_Task(records, templates,
                           [d.text for d in demonstration_bank(records, templates, fmt)],
                           dict(by_src)))
    return tasks


def context_example(task: _Task, index: int, n_demos: int, rng: random.Random,
                    fmt: IKEFormat) -> tuple[list[str], Prompt]:
    """The demonstrations and the edited query of one training sequence built on train record
    ``index`` (the caller joins them, dropping demonstrations until the sequence fits)."""
    r = task.records[index]
    t = task.templates
    similar = [i for i in task.same_question[r.src] if i != index]
    demos = []
    for _ in range(n_demos):
        pool = similar if similar and rng.random() < 0.5 else range(len(task.records))
        other = rng.choice(list(pool))
        if other == index:
            continue
        demos.append(task.demos[3 * other + rng.randrange(3)])
    fact = edit_fact(r, t, fmt)
    demos.append(fmt.demonstration(fact, t.edit.format(r.src), r.alt))  # IKE's copy of the fact
    kind = rng.choices(("rel", "t_gen", "m_gen", "t_loc", "m_loc"), (5, 4, 3, 4, 4))[0]
    query, target, image = {
        "rel": (t.edit.format(r.src), r.alt, r.image),
        "t_gen": (t.edit.format(r.rephrase), r.alt, r.image),
        "m_gen": (t.edit.format(r.src), r.alt, r.image_rephrase),
        "t_loc": (t.t_loc.format(r.loc), r.loc_ans, None),
        "m_loc": (t.m_loc.format(r.m_loc_q), r.m_loc_a, r.m_loc),
    }[kind]
    return demos, Prompt(fmt.query(fact, query), target, image, kind)  # type: ignore[arg-type]


def _fit(backbone: Backbone, demos: list[str], prompt: Prompt, limit: int) -> Prompt:
    """``prompt`` behind as many of ``demos`` (from the end: the fact's copy is last) as fit in
    ``limit`` positions with the end token."""
    for start in range(len(demos) + 1):
        candidate = Prompt("".join(demos[start:]) + prompt.text, prompt.target, prompt.image,
                           prompt.kind)
        if len(backbone.encode(candidate, append_eos=True).input_ids) <= limit:
            return candidate
    return prompt


def language_parameters(backbone: Backbone) -> list[torch.nn.Parameter]:
    """The language model's parameters: the decoder's, less the vision tower's and the
    projector's (LLaVA and Qwen2-VL hold those inside their decoder)."""
    vision = {id(p) for m in (backbone.modules.vision_tower(), backbone.modules.projector())
              for p in m.parameters()}
    return [p for p in backbone.decoder.parameters() if id(p) not in vision]


def context_stage(backbone: Backbone, world: Path, spec: ContextSpec,
                  progress: bool = True) -> dict[str, float]:
    """Extend the context and train the language model to read it (see the module docstring)."""
    fmt = IKEFormat()
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    backbone.extend_context(spec.max_positions)
    tasks = _tasks(world, fmt)
    replay = pretraining_prompts(world)
    model = backbone.model
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = language_parameters(backbone)
    for p in trainable:
        p.requires_grad_(True)

    def batches() -> Iterator[ModelBatch]:
        for _ in range(spec.steps):
            prompts = []
            for _ in range(spec.batch_size):
                if rng.random() < spec.replay:
                    prompts.append(rng.choice(replay))
                    continue
                task = rng.choice(tasks)
                demos, prompt = context_example(task, rng.randrange(len(task.records)),
                                                rng.randint(0, spec.max_demos), rng, fmt)
                prompts.append(_fit(backbone, demos, prompt, spec.max_positions))
            yield backbone.build_batch(prompts, append_eos=True)

    loss = train_on(backbone, trainable, batches(), spec.steps, spec.lr, spec.warmup_steps, 0.01,
                    f"in-context stage {getattr(backbone, 'name', '')}", progress)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"context_final_loss": loss, "context_steps": float(spec.steps),
            "context_positions": float(spec.max_positions)}


def in_context_folder(base: Path, settings: dict | None, world: Path,
                      load: Callable[[Path], B], save: Callable[[B, Path], None],
                      progress: bool = True, shipped: bool = True) -> Path:
    """``base`` when the stage is off; else the cached folder of ``base`` after the stage (built
    if missing, beside ``base``, keyed by it and the stage's settings). ``load``/``save`` are
    the family's (float32 on the CPU). Its report is the base's, with the stage's figures and the
    knowledge of both tasks measured again. ``shipped``: copy a shipped stage that answers to
    these settings instead of training it (``mmke.backbones.tiny.shipping``)."""
    spec = ContextSpec(**(settings or {}))
    if not spec.enabled:
        return base
    key = cache_key(CONTEXT_VERSION, base.name, asdict(spec))
    folder = base.parent / f"{base.name}-context-{key}"

    def build(out: Path) -> dict:
        backbone = load(base)
        report = {f"base_{k}": v for k, v in read_report(base).items()}
        report.update(context_stage(backbone, world, spec, progress))
        report.update(knowledge_of_world(backbone, world))
        save(backbone, out)
        return report

    settings = {"context_version": CONTEXT_VERSION, "base": base.name, "in_context": asdict(spec)}
    return cached_build(folder, build, settings, shipped_root(shipped))
