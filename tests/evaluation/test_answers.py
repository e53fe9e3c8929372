"""Generated-answer scores on hand-written answers; expected F1 values are worked out by hand."""

import pytest

from mmke.evaluation.answers import answer_exact, answer_f1, answer_tokens, normalize_answer


@pytest.mark.parametrize("text, normalised", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  a   red\tsquare\n", "red square"),
    ("An apple.", "apple"),
    ("RED!", "red"),
    ("don't", "dont"),                           # punctuation deleted, not split on
    ("U.S.A.", "usa"),
    ("theatre", "theatre"),                      # articles only as whole words
    ("another answer", "another answer"),
    ("the, the; a an", ""),
    ("", ""),
])
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_ignores_case_punctuation_articles_and_spacing():
    assert answer_exact("The red square.", "red square") == 1.0
    assert answer_exact("RED", "red") == 1.0
    assert answer_exact("a  circle", "the circle!") == 1.0
    assert answer_exact("red square", "red") == 0.0     # an answer that runs on is not the target
    assert answer_exact("red red", "red") == 0.0
    assert answer_exact("", "") == 1.0


def test_f1_partial_overlap():
    # pred {red, square, is, big}, gold {red, square}: P = 2/4, R = 2/2, F1 = 2*.5*1/1.5 = 2/3
    assert answer_f1("the red square is big", "red square") == pytest.approx(2 / 3)
    # pred {blue, circle}, gold {blue, square, left}: P = 1/2, R = 1/3, F1 = 2*(1/6)/(5/6) = 0.4
    assert answer_f1("blue circle", "blue square left") == pytest.approx(0.4)
    assert answer_f1("Red.", "the red") == 1.0
    assert answer_f1("green", "red") == 0.0


def test_f1_counts_repeated_tokens_once_per_match():
    # pred {red x3}, gold {red}: overlap 1, P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 0.5
    assert answer_f1("red red red", "red") == pytest.approx(0.5)
    # pred {red, red, blue}, gold {red, red}: overlap 2, P = 2/3, R = 1, F1 = 0.8
    assert answer_f1("red red blue", "red red") == pytest.approx(0.8)
    # pred {red, blue}, gold {red, red}: overlap 1, P = 1/2, R = 1/2, F1 = 0.5
    assert answer_f1("red blue", "red red") == pytest.approx(0.5)


def test_f1_on_empty_answers():
    assert answer_f1("", "") == 1.0
    assert answer_f1("the", "a") == 1.0       # both empty after normalisation
    assert answer_f1("", "red") == 0.0
    assert answer_f1("red", "...") == 0.0


def test_answer_tokens():
    assert answer_tokens("The red, red square.") == ["red", "red", "square"]
