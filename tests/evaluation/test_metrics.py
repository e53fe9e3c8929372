"""Metric definitions on hand-built logits."""

import math

import pytest
import torch

from mmke.evaluation import metrics


def one_hot_logits(ids: list[int], vocab: int = 5, high: float = 5.0) -> torch.Tensor:
    logits = torch.zeros(len(ids), vocab)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = high
    return logits


def test_token_accuracy_counts_correct_target_tokens():
    logits = one_hot_logits([1, 2, 3, 0])
    correct = metrics.target_correct(logits, torch.tensor([1, 2, 4, 4]))
    assert correct.tolist() == [True, True, False, False]
    assert metrics.token_accuracy(correct) == pytest.approx(0.5)


def test_exact_match_needs_every_token():
    logits = one_hot_logits([1, 2, 3])
    assert metrics.exact_match(metrics.target_correct(logits, torch.tensor([1, 2, 3]))) == 1.0
    assert metrics.exact_match(metrics.target_correct(logits, torch.tensor([1, 2, 4]))) == 0.0


def test_empty_targets_are_an_error():
    with pytest.raises(ValueError):
        metrics.token_accuracy(torch.zeros(0, dtype=torch.bool))


def test_topk_agreement_is_ordered_and_elementwise():
    ref = torch.tensor([[1, 2, 3], [4, 0, 1]])
    assert metrics.topk_agreement(ref.clone(), ref) == 1.0
    swapped = torch.tensor([[2, 1, 3], [4, 0, 1]])  # same set, different order in row 0
    assert metrics.topk_agreement(swapped, ref) == pytest.approx(4 / 6)


def test_topk_agreement_from_logits_k1_is_argmax_agreement():
    pre = torch.tensor([[0.1, 2.0, 0.3], [1.0, 0.0, 0.5]])
    post = torch.tensor([[0.1, 0.2, 3.0], [1.0, 0.0, 0.5]])
    agreement = metrics.topk_agreement(post.topk(1).indices, pre.topk(1).indices)
    assert agreement == pytest.approx(0.5)


def test_exp_neg_kl_matches_hand_computation():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.5, 0.25]])
    kl = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert metrics.exp_neg_kl(p.log(), q.log()) == pytest.approx(math.exp(-kl), rel=1e-6)
    assert metrics.exp_neg_kl(p.log(), p.log()) == pytest.approx(1.0)


def test_exp_neg_kl_averages_exp_over_positions():
    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]]).log()
    q = torch.tensor([[0.1, 0.9], [0.5, 0.5]]).log()
    kl0 = 0.9 * math.log(9) + 0.1 * math.log(1 / 9)
    assert metrics.exp_neg_kl(p, q) == pytest.approx((math.exp(-kl0) + 1.0) / 2, rel=1e-6)
