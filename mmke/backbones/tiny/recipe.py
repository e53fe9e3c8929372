"""The parts every tiny family's recipe shares: initialisation from scratch, the two training
stages around a frozen vision side, and the knowledge report written beside the weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from mmke.backbones.base import Backbone
from mmke.backbones.tiny.corpus import pretraining_prompts
from mmke.backbones.tiny.pretrain import PretrainSpec, pretrain
from mmke.data.miniworld.generate import ANNOTATION_FILES
from mmke.data.miniworld.heldout import HELDOUT_FILES
from mmke.data.mmedit import load_mmedit
from mmke.data.prompts import CAPTION_TEMPLATE, VQA_TEMPLATE, PromptTemplates
from mmke.evaluation.knowledge import KNOWLEDGE_KINDS, knowledge_report

# What the held-out split changes of an eval record: its rephrases and (E-IC) its target.
HELDOUT_KINDS = ("orig_rephrase", "orig_image_rephrase", "alt")


def fan_in_init(module: nn.Module, gain: float = 1.0) -> None:
    """Every linear layer of ``module`` drawn with std ``gain / sqrt(fan_in)``, biases zero.

    BERT-style std 0.02 in 64 dimensions shrinks the image signal hundreds of times through a few
    projections, and training then never finds the image; fan-in scaling keeps it at the size
    of the states. A small ``gain`` on the vision-to-language projector starts image embeddings
    near the size of text embeddings (measured on BLIP-2: far faster grounding)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, 0.0, gain * sub.in_features ** -0.5)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def two_stage_training(backbone: Backbone, world: Path, train: PretrainSpec,
                       stage1: Callable[[], dict[str, float]] | None,
                       vision_side: Sequence[nn.Parameter], progress: bool = True,
                       vision_pretrained: bool = False) -> dict:
    """Stage 1 (if given) trains the vision side alone; stage 2 trains everything else on the
    train split's prompts with the vision side frozen (as BLIP-2, MiniGPT-4 and LLaVA keep their
    image encoder frozen). Without stage 1 everything trains end to end, unless the vision side
    comes pretrained (MiniGPT-4 takes BLIP-2's). Returns the report, with the knowledge of both
    tasks' eval split measured at the end."""
    report: dict = {"parameters": sum(p.numel() for p in backbone.model.parameters())}
    if stage1 is not None:
        report.update(stage1())
    for p in vision_side:
        p.requires_grad_(stage1 is None and not vision_pretrained)
    report.update(pretrain(backbone, pretraining_prompts(world), train, progress=progress))
    for p in vision_side:
        p.requires_grad_(True)
    report.update(knowledge_of_world(backbone, world))
    return report


def knowledge_of_world(backbone: Backbone, world: Path) -> dict[str, float]:
    """Knowledge on both tasks' eval split, keys prefixed ``vqa_`` / ``caption_``, and on their
    held-out eval split (``mmke.data.miniworld.heldout``), prefixed ``vqa_heldout_`` /
    ``caption_heldout_``: only what differs there (its original questions and locality prompts
    are the eval split's), ``orig_rephrase`` and ``orig_image_rephrase``: whether the model
    understands wordings and pictures it was never trained on; ``alt`` and ``alt_tokens``: the
    unedited Rel on the targets the regularizers' tables use."""
    report: dict[str, float] = {}
    for task, template in (("vqa", VQA_TEMPLATE), ("caption", CAPTION_TEMPLATE)):
        for prefix, name, kinds in (
                (task, ANNOTATION_FILES[(task, "eval")], KNOWLEDGE_KINDS),
                (f"{task}_heldout", HELDOUT_FILES[task], HELDOUT_KINDS)):
            records = load_mmedit(world / name, world, task)
            known = knowledge_report(backbone, records, PromptTemplates(edit=template), kinds=kinds)
            report.update({f"{prefix}_{k}": v for k, v in known.items()})
    return report
