"""Every pretrained tiny backbone really knows its world before any edit: at least 90% of the
eval split's original answers, text-locality answers and multimodal-locality answers, on both
tasks. Every family's default build ships with the package (the other families' tests are also
marked ``families``, for `make test-families`); every family's recipe runs from scratch on a
small world in tests/backbones/test_tiny_builds.py."""

from dataclasses import replace
from pathlib import Path

import pytest
from hydra.utils import instantiate

from mmke.backbones.base import Backbone
from mmke.backbones.tiny.builder import DONE_MARKER, read_report
from mmke.evaluation.knowledge import knowledge_report
from tests.conftest import FULL_BUILD, compose_config

BAR = 0.90
FAMILIES = [pytest.param("tiny_blip2"),
            pytest.param("tiny_llava", marks=FULL_BUILD),
            pytest.param("tiny_minigpt4", marks=FULL_BUILD),
            pytest.param("tiny_qwen2vl", marks=FULL_BUILD)]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request) -> Backbone:
    return instantiate(compose_config([f"backbone={request.param}"]).backbone)


@pytest.fixture(scope="module", params=["mini_vqa", "mini_caption"])
def source(request):
    return instantiate(compose_config([f"data={request.param}"]).data)


@pytest.fixture(scope="module")
def report(tiny, source):
    return knowledge_report(tiny, source.records("eval"), source.templates)


@pytest.mark.parametrize("what", ["orig", "t_loc", "m_loc"])
def test_knows_the_eval_answers(report, what):
    assert report[what] >= BAR, report


def test_does_not_already_answer_the_counterfactual(report):
    assert report["alt"] <= 1 - BAR, report


def test_answers_depend_on_the_picture(tiny, vqa_source):
    """Give every record another scene's picture: the original answers are mostly lost."""
    records = vqa_source.records("eval", limit=300)
    shifted = [replace(r, image=records[(i + 7) % len(records)].image) for i, r in enumerate(records)]
    right = knowledge_report(tiny, records, vqa_source.templates)["orig"]
    wrong = knowledge_report(tiny, shifted, vqa_source.templates)["orig"]
    assert right >= wrong + 0.2, (right, wrong)


def build_folder(tiny: Backbone) -> Path:
    """The cache folder holding the build report (MiniGPT-4 keeps its Llama in a subfolder)."""
    model = getattr(tiny.model, "language_model", tiny.model)
    folder = Path(getattr(tiny.model, "config", model.config)._name_or_path)
    return folder if (folder / DONE_MARKER).is_file() else folder.parent


def test_build_report_is_cached_with_the_weights(tiny):
    report = read_report(build_folder(tiny))
    assert report["parameters"] == sum(p.numel() for p in tiny.model.parameters())
    assert report.get("stage1_eval_column_accuracy", 1.0) >= BAR  # MiniGPT-4 reuses BLIP-2's
    assert report["vqa_orig"] >= BAR and report["caption_orig"] >= BAR


# The aim for the held-out eval split: the unedited model still answers at least 80% of
# its original questions through wordings and pictures pretraining never paired with them.
HELDOUT_BAR = 0.80


@pytest.mark.parametrize("rephrase", ["orig_rephrase", "orig_image_rephrase"])
@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_understands_the_heldout_rephrases(tiny, task, rephrase):
    """Builds of a 2-core AMD EPYC without AVX-512: at least 87.4% (tiny MiniGPT-4, E-VQA
    wordings). Tiny Qwen2-VL at the 6 epochs it used to train answered 76.7% through the held-out
    wordings; at 12, 89.0%."""
    report = read_report(build_folder(tiny))
    assert report[f"{task}_heldout_{rephrase}"] >= HELDOUT_BAR, report


def test_heldout_caption_targets_are_new_to_the_model(tiny):
    """MMEdit's Pre-edited Rel on E-IC is 0.00; a recoloured caption is mostly already known."""
    report = read_report(build_folder(tiny))
    assert report["caption_heldout_alt_tokens"] < 0.5 * report["caption_alt_tokens"], report
    assert report["caption_heldout_alt"] == 0.0, report


def test_a_subset_of_kinds_scores_the_same_as_the_whole_report(tiny, vqa_source):
    records = vqa_source.records("eval", limit=12)
    whole = knowledge_report(tiny, records, vqa_source.templates)
    part = knowledge_report(tiny, records, vqa_source.templates, kinds=("alt", "orig_rephrase"))
    assert part == {k: whole[k] for k in ("orig_rephrase", "alt", "alt_tokens")}
    with pytest.raises(ValueError, match="unknown knowledge kinds"):
        knowledge_report(tiny, records, vqa_source.templates, kinds=("rel",))
