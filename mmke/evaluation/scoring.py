"""One batched forward over many prompts, cut back into what each prompt's metrics need."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmke.backbones.base import IGNORE_INDEX, Backbone, ForwardOutput, ModelBatch
from mmke.data.record import Prompt
from mmke.evaluation.metrics import target_correct


@dataclass
class PromptOutput:
    """What the metrics need of one prompt: whether each target token is the argmax, and for
    locality prompts the top-k ids and/or log-probabilities at the compared positions (on CPU)."""

    target_correct: torch.Tensor
    topk: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None


@dataclass(frozen=True)
class Need:
    """Per prompt: how many top-k ids to keep (0: none), and whether to keep log-probs."""

    k: int = 0
    logprobs: bool = False


def compared_positions(batch: ModelBatch, row: int, mode: str) -> torch.Tensor:
    """Positions of ``row`` whose next-token predictions a locality metric compares
    (``mmke.evaluation.spec.POSITIONS`` names the conventions).

    Chosen from the row's own content (not absolute indices), so pre- and post-edit forwards of
    the same prompt agree even when padding differs between batches.
    """
    if mode == "easyedit":
        # EasyEdit (multimodal_evaluate.py, vl_utils.topk_token_match) compares the logits of the
        # whole unpadded sequence: image positions, prompt, answer and the last position.
        return batch.attention_mask[row].bool().nonzero(as_tuple=True)[0]
    if mode == "text":
        text = batch.attention_mask[row].bool() & ~batch.image_token_mask[row]
        return text.nonzero(as_tuple=True)[0]
    targets = (batch.labels[row, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    if mode == "target":
        return targets
    if mode == "first":
        return targets[:1]
    raise ValueError(f"unknown locality position convention {mode!r}")


@torch.inference_mode()
def score_prompts(forward: Callable[[ModelBatch], ForwardOutput], backbone: Backbone,
                  prompts: Sequence[Prompt], needs: Sequence[Need], positions: str) -> list[PromptOutput]:
    """Score ``prompts`` with a single forward of ``forward`` (the edited or unedited model)."""
    batch = backbone.prepare(prompts)
    logits = forward(batch).logits
    # One argmax and one comparison for the whole batch; rows are cut apart on the CPU.
    targets = batch.labels[:, 1:]
    is_target = (targets != IGNORE_INDEX).cpu()
    correct = target_correct(logits[:, :-1], targets).cpu()
    outputs = []
    for row, need in enumerate(needs):
        out = PromptOutput(correct[row][is_target[row]])
        if need.k or need.logprobs:
            at = logits[row, compared_positions(batch, row, positions)].float()
            if need.k:
                out.topk = at.topk(need.k, dim=-1).indices.cpu()
            if need.logprobs:
                out.logprobs = at.log_softmax(-1).cpu()
        outputs.append(out)
    return outputs
