"""Each locality position convention pinned on hand-built logits and a hand-built batch.

The batch is one left-padded image prompt: [pad, img, img, img, bos, q1, q2, a1] with the answer
token a1 labelled. Position p's logits predict token p+1.
"""

from dataclasses import dataclass

import pytest
import torch

from mmke.backbones.base import IGNORE_INDEX, ForwardOutput, ModelBatch
from mmke.data.record import Prompt
from mmke.data.prompts import PromptTemplates
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.scoring import Need, compared_positions, score_prompts
from mmke.evaluation.spec import POSITIONS, MetricSpec
from mmke.errors import ConfigError

VOCAB = 12
PROMPT = Prompt("q", "a", None, "m_loc")


def hand_batch(extra_prefix: int = 0) -> ModelBatch:
    """The batch above; ``extra_prefix`` text tokens inserted after the pad (an IKE-style longer
    post-edit prompt), so the shared suffix sits at the same distance from the end."""
    ids = [0] + [9, 9, 9] + [5] * extra_prefix + [1, 6, 7, 8]
    n = len(ids)
    image = [False] + [True] * 3 + [False] * (n - 4)
    labels = [IGNORE_INDEX] * (n - 1) + [8]
    return ModelBatch(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([[0] + [1] * (n - 1)]),
                      labels=torch.tensor([labels]), image_token_mask=torch.tensor([image]),
                      pixel_values=None, image_index=torch.zeros(0, dtype=torch.long))


@dataclass
class HandBackbone:
    """Stands in for a backbone's ``prepare``: always the hand-built batch."""

    batch: ModelBatch

    def prepare(self, prompts):
        return self.batch


def one_hot(argmax: list[int]) -> torch.Tensor:
    logits = torch.zeros(1, len(argmax), VOCAB)
    logits[0, torch.arange(len(argmax)), torch.tensor(argmax)] = 4.0
    return logits


PRE = [2, 3, 4, 5, 6, 7, 8, 10]  # argmax per position 0..7 of the pre-edit model


def locality(post_argmax: list[int], positions: str, k: int = 1, post_prefix: int = 0) -> float:
    spec = MetricSpec(loc_positions=positions)
    ev = Evaluator(spec, PromptTemplates())
    need = [Need(k, False)]
    pre_batch, post_batch = hand_batch(), hand_batch(post_prefix)
    ref, = score_prompts(lambda b: ForwardOutput(one_hot(PRE)), HandBackbone(pre_batch), [PROMPT],
                         need, positions)
    post, = score_prompts(lambda b: ForwardOutput(one_hot(post_argmax)), HandBackbone(post_batch),
                          [PROMPT], need, positions)
    return ev._locality(post, ref)


def test_compared_positions_of_each_convention():
    batch = hand_batch()
    got = {mode: compared_positions(batch, 0, mode).tolist() for mode in POSITIONS}
    assert got == {"easyedit": [1, 2, 3, 4, 5, 6, 7], "text": [4, 5, 6, 7], "target": [6],
                   "first": [6]}


def test_unchanged_model_agrees_everywhere():
    for mode in POSITIONS:
        assert locality(PRE, mode) == 1.0


def test_image_positions_change_text_positions_do_not():
    """EasyEdit's M-Loc falls (3 of 7 positions changed); every text-only convention stays 100."""
    post = [2, 0, 0, 0, 6, 7, 8, 10]
    assert locality(post, "easyedit") == pytest.approx(4 / 7)
    assert locality(post, "text") == 1.0
    assert locality(post, "target") == 1.0
    assert locality(post, "first") == 1.0


def test_answer_position_changes():
    post = list(PRE)
    post[6] = 0  # the prediction of the answer token changes
    assert locality(post, "easyedit") == pytest.approx(6 / 7)
    assert locality(post, "text") == pytest.approx(3 / 4)
    assert locality(post, "target") == 0.0
    assert locality(post, "first") == 0.0


def test_padding_position_is_never_compared():
    post = list(PRE)
    post[0] = 0
    for mode in POSITIONS:
        assert locality(post, mode) == 1.0


def test_topk_is_ordered_over_ranks():
    """k=2: the second-ranked id of one image position differs: 1 of 14 rank slots."""
    pre_logits = one_hot(PRE)
    pre_logits[0, :, 11] = 2.0  # every position's second choice is 11
    post_logits = pre_logits.clone()
    post_logits[0, 2, 11] = 0.0
    post_logits[0, 2, 0] = 2.0  # position 2's second choice becomes 0
    ev = Evaluator(MetricSpec(loc_positions="easyedit"), PromptTemplates())
    ref, = score_prompts(lambda b: ForwardOutput(pre_logits), HandBackbone(hand_batch()), [PROMPT],
                         [Need(2)], "easyedit")
    post, = score_prompts(lambda b: ForwardOutput(post_logits), HandBackbone(hand_batch()), [PROMPT],
                          [Need(2)], "easyedit")
    assert ev._locality(post, ref) == pytest.approx(13 / 14)


def test_longer_post_prompt_is_right_aligned():
    """An IKE-style post-edit prompt with 2 more tokens: EasyEdit keeps the last 7 positions of each."""
    same_suffix = [0, 0, 0, 3, 4, 5, 6, 7, 8, 10]  # the last 7 positions equal the pre-edit ones
    assert locality(same_suffix, "easyedit", post_prefix=2) == 1.0
    post = [2, 9, 9, 3, 0, 5, 6, 7, 8, 10]  # one of the aligned positions differs
    assert locality(post, "easyedit", post_prefix=2) == pytest.approx(6 / 7)
    assert locality(post, "text", post_prefix=2) == 1.0
    assert locality(post, "target", post_prefix=2) == 1.0


def test_kl_locality_is_right_aligned_too():
    spec = MetricSpec(locality="kl", loc_positions="easyedit")
    ev = Evaluator(spec, PromptTemplates())
    need = [Need(0, True)]
    ref, = score_prompts(lambda b: ForwardOutput(one_hot(PRE)), HandBackbone(hand_batch()), [PROMPT],
                         need, "easyedit")
    post, = score_prompts(lambda b: ForwardOutput(one_hot([0, 0] + PRE)), HandBackbone(hand_batch(2)),
                          [PROMPT], need, "easyedit")
    assert ev._locality(post, ref) == pytest.approx(1.0)


def test_old_all_setting_names_its_replacements():
    with pytest.raises(ConfigError, match="text.*easyedit"):
        MetricSpec(loc_positions="all")
