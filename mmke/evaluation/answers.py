"""Scoring a generated answer against the target text, as extractive QA scoring does.

Teacher-forced token accuracy reads the target's tokens off the logits one position at a time,
given the gold prefix; it cannot see an answer that runs on past the target or never stops
("The Mirage of Model Editing", arXiv 2502.11177). These scores compare the text the model
actually generates (greedy) with the target instead.

Normalisation is the one of the official SQuAD v1.1 evaluation script (``normalize_answer``):
lower case, delete ASCII punctuation, delete the articles a/an/the, collapse whitespace. It is
not the VQA script's processing (which also maps number words to digits and fixes contractions):
MMEdit's targets are free-text answers, and SQuAD's rule is the one the Mirage paper's EM/F1 and
most generation-based editing evaluations inherit. Empty answers follow SQuAD v2.0: two empty
answers agree (F1 1.0), one empty answer scores 0.0.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, punctuation deleted (so "don't" -> "dont"),
    articles a/an/the deleted as whole words, whitespace collapsed to single spaces."""
    lowered = text.lower()
    # punctuation is deleted, not replaced by a space, exactly as the SQuAD script does
    no_punctuation = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    no_articles = _ARTICLES.sub(" ", no_punctuation)
    return " ".join(no_articles.split())


def answer_tokens(text: str) -> list[str]:
    """The whitespace tokens of the normalised answer (the units of ``answer_f1``)."""
    return normalize_answer(text).split()


def answer_exact(pred: str, gold: str) -> float:
    """1.0 when the two answers are equal after ``normalize_answer``, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def answer_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 over normalised whitespace tokens, counting repeats (multiset overlap).

    Both answers empty after normalisation: 1.0; exactly one empty: 0.0 (SQuAD v2.0's rule).
    """
    pred_tokens, gold_tokens = answer_tokens(pred), answer_tokens(gold)
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)
