"""Pretrain a tiny backbone on its world, family-independently (any ``Backbone`` works)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mmke.backbones.base import Backbone
from mmke.data.record import Prompt


@dataclass(frozen=True)
class PretrainSpec:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    seed: int = 0


def pretrain(backbone: Backbone, prompts: Sequence[Prompt], spec: PretrainSpec,
             progress: bool = True) -> dict[str, float]:
    """Teacher-forced next-token training on target tokens (+ end token), AdamW with warmup and
    cosine decay. Prompts are tokenized once; batches are reshuffled every epoch."""
    encoded = [backbone.encode(p, append_eos=True) for p in prompts]
    model = backbone.model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen parts stay exact
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / spec.batch_size)
    total = steps_per_epoch * spec.epochs

    def schedule(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(spec.seed)
    bar = tqdm(total=total, desc=f"pretraining {getattr(backbone, 'name', 'backbone')}",
               disable=not progress, unit="step")
    loss_value = float("nan")
    for _ in range(spec.epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), spec.batch_size):
            batch = backbone.collate([encoded[i] for i in order[start:start + spec.batch_size]])
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
    return {"final_loss": loss_value, "steps": float(total)}
