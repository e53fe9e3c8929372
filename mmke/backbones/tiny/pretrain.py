"""Pretrain a tiny backbone on its world, family-independently (any ``Backbone`` works)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mmke.backbones.base import Backbone, ModelBatch
from mmke.data.record import Prompt
from mmke.progress import progress_bar


@dataclass(frozen=True)
class PretrainSpec:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    seed: int = 0


def warmup_cosine(warmup_steps: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``step``: linear warmup, then cosine decay to zero."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total - warmup_steps)))

    return schedule


def train_on(backbone: Backbone, trainable: Sequence[torch.nn.Parameter],
             batches: Iterable[ModelBatch], total: int, lr: float, warmup_steps: int,
             weight_decay: float, desc: str, progress: bool = True) -> float:
    """Teacher-forced next-token training of ``trainable`` on ``total`` batches: AdamW, warmup
    and cosine decay, gradients clipped at norm 1. Returns the last loss; the model is left in
    eval mode. The tiny recipes' stage 2 and their in-context stage both train through it."""
    model = backbone.model
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total))
    bar = progress_bar(total=total, desc=desc, disable=not progress, unit="step")
    loss_value = float("nan")
    for batch in batches:
        batch = batch.to(backbone.device, backbone.dtype)
        loss = backbone.nll(batch, backbone.forward(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    model.eval()
    return loss_value


def pretrain(backbone: Backbone, prompts: Sequence[Prompt], spec: PretrainSpec,
             progress: bool = True) -> dict[str, float]:
    """Teacher-forced next-token training on target tokens (+ end token), AdamW with warmup and
    cosine decay. Prompts are tokenized once; batches are reshuffled every epoch."""
    encoded = [backbone.encode(p, append_eos=True) for p in prompts]
    trainable = [p for p in backbone.model.parameters() if p.requires_grad]  # frozen parts stay exact
    total = math.ceil(len(encoded) / spec.batch_size) * spec.epochs
    generator = torch.Generator().manual_seed(spec.seed)

    def batches() -> Iterator[ModelBatch]:
        for _ in range(spec.epochs):
            order = torch.randperm(len(encoded), generator=generator).tolist()
            for start in range(0, len(order), spec.batch_size):
                yield backbone.collate([encoded[i] for i in order[start:start + spec.batch_size]])

    loss = train_on(backbone, trainable, batches(), total, spec.lr, spec.warmup_steps,
                    spec.weight_decay, f"pretraining {getattr(backbone, 'name', 'backbone')}",
                    progress)
    return {"final_loss": loss, "steps": float(total)}
