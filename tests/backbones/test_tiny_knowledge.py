"""The pretrained tiny BLIP-2 really knows its world before any edit: at least 90% of the eval
split's original answers, text-locality answers and multimodal-locality answers, on both tasks."""

from dataclasses import replace
from pathlib import Path

import pytest
from hydra.utils import instantiate

from mmke.backbones.tiny.builder import read_report
from mmke.evaluation.knowledge import knowledge_report
from tests.conftest import compose_config

BAR = 0.90


@pytest.fixture(scope="module", params=["mini_vqa", "mini_caption"])
def source(request):
    return instantiate(compose_config([f"data={request.param}"]).data)


@pytest.fixture(scope="module")
def report(pretrained, source):
    return knowledge_report(pretrained, source.records("eval"), source.templates)


@pytest.mark.parametrize("what", ["orig", "t_loc", "m_loc"])
def test_knows_the_eval_answers(report, what):
    assert report[what] >= BAR, report


def test_does_not_already_answer_the_counterfactual(report):
    assert report["alt"] <= 1 - BAR, report


def test_answers_depend_on_the_picture(pretrained, vqa_source):
    """Give every record another scene's picture: the original answers are mostly lost."""
    records = vqa_source.records("eval", limit=300)
    shifted = [replace(r, image=records[(i + 7) % len(records)].image) for i, r in enumerate(records)]
    right = knowledge_report(pretrained, records, vqa_source.templates)["orig"]
    wrong = knowledge_report(pretrained, shifted, vqa_source.templates)["orig"]
    assert right >= wrong + 0.2, (right, wrong)


def test_build_report_is_cached_with_the_weights(pretrained):
    report = read_report(Path(pretrained.model.config._name_or_path))
    assert report["parameters"] == sum(p.numel() for p in pretrained.model.parameters())
    assert report["stage1_eval_column_accuracy"] >= BAR
    assert report["vqa_orig"] >= BAR and report["caption_orig"] >= BAR
