"""Greedy generation for generated-answer scoring, on the random tiny models of every family.

- generation never sees the target, and its length does not depend on it;
- a batch generates what each prompt generates alone (left padding, mixed image/text rows);
- a checkpoint's generation settings cannot turn greedy decoding into something else;
- the Mirage case (arXiv 2502.11177): FT without an end token reaches 100% teacher-forced Rel while
  the generated answer runs on past the target (exact match 0); with the end token it is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmke.backbones.base import Backbone
from mmke.data.prompts import VQA_TEMPLATE, PromptTemplates, edit_prompts
from mmke.data.record import EditRecord, LazyImage, Prompt
from mmke.editors.base import NoEdit
from mmke.editors.ft import FineTune
from mmke.evaluation.answers import answer_exact, normalize_answer
from mmke.evaluation.generation import generate_answers
from tests.backbones.families import FAMILIES, build

QUESTION = VQA_TEMPLATE.format("What colour is the square?")
MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[LazyImage]:
    """Two plain pictures of different sizes (Qwen2-VL gives them different token counts)."""
    folder = tmp_path_factory.mktemp("generation_images")
    out = []
    for i, (colour, width) in enumerate([((220, 30, 30), 48), ((30, 30, 220), 64)]):
        path = folder / f"im{i}.png"
        Image.new("RGB", (width, 48), colour).save(path)
        out.append(LazyImage(Path(path)))
    return out


@pytest.fixture(scope="module")
def prompts(images) -> list[Prompt]:
    """Image and text-only rows of different lengths, so the batch is padded."""
    return [Prompt(QUESTION, "red", images[0]),
            Prompt("nq question: a photo of green", "circle", None),
            Prompt(VQA_TEMPLATE.format("What?"), "blue square", images[1]),
            Prompt("nq question: a photo", "green", None),
            Prompt(QUESTION, "green", images[0])]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def backbone(request) -> Backbone:
    return build(request.param)


def attached(editor, backbone: Backbone):
    editor.attach(backbone, PromptTemplates())
    return editor


def test_generation_never_sees_the_target(backbone, images, monkeypatch):
    calls: list[dict] = []
    encode = backbone.encode

    def spy(prompt, append_eos=False, with_target=True):
        calls.append({"target": prompt.target, "append_eos": append_eos,
                      "with_target": with_target})
        return encode(prompt, append_eos, with_target=with_target)

    monkeypatch.setattr(backbone, "encode", spy)
    short = Prompt(QUESTION, "red", images[0])
    long = Prompt(QUESTION, "a long blue square that is on the left " * 4, images[0])
    answers = backbone.generate([short, long], max_new_tokens=MAX_NEW)
    assert answers[0] == answers[1]
    assert backbone.generate([long], max_new_tokens=MAX_NEW) == [answers[0]]
    assert calls and all(not c["with_target"] and not c["append_eos"] for c in calls)


def test_a_batch_generates_what_each_prompt_generates_alone(backbone, prompts):
    batched = backbone.generate(prompts, max_new_tokens=MAX_NEW)
    alone = [backbone.generate([p], max_new_tokens=MAX_NEW)[0] for p in prompts]
    assert batched == alone
    assert batched[0] == batched[4]  # the same prompt in two rows of one batch


def test_greedy_ignores_the_checkpoints_generation_settings(backbone, prompts):
    """A released generation_config.json (repetition penalty, n-gram blocking, a minimum length)
    fills every setting generate is not given; none of them may change greedy answers."""
    plain = backbone.generate(prompts, max_new_tokens=MAX_NEW)
    configs = [m.generation_config for m in backbone.model.modules()
               if getattr(m, "generation_config", None) is not None]
    assert configs
    saved = [c.to_dict() for c in configs]
    try:
        for c in configs:
            c.repetition_penalty, c.no_repeat_ngram_size = 5.0, 1
            c.min_new_tokens, c.suppress_tokens = MAX_NEW, list(range(5, 40))
        assert backbone.generate(prompts, max_new_tokens=MAX_NEW) == plain
    finally:
        for c, values in zip(configs, saved):
            c.update(**values)


def test_generation_stops_at_the_budget(backbone, prompts):
    """Random weights rarely pick the end token, so answers grow with max_new_tokens."""
    short = backbone.generate(prompts, max_new_tokens=2)
    longer = backbone.generate(prompts, max_new_tokens=MAX_NEW)
    assert any(len(a) < len(b) for a, b in zip(short, longer))


def test_generate_answers_chunks_by_batch_size(backbone, prompts, monkeypatch):
    editor = attached(NoEdit(), backbone)
    sizes: list[int] = []
    generate = editor.generate

    def spy(chunk: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        sizes.append(len(chunk))
        return generate(chunk, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(editor, "generate", spy)
    whole = generate_answers(editor, prompts, MAX_NEW, batch_size=len(prompts))
    assert generate_answers(editor, prompts, MAX_NEW, batch_size=2) == whole
    assert sizes == [5, 2, 2, 1]
    assert generate_answers(editor, [], MAX_NEW, batch_size=2) == []


def test_generate_answers_rejects_bad_sizes(backbone, prompts):
    editor = attached(NoEdit(), backbone)
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(editor, prompts, MAX_NEW, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(editor, prompts, 0, batch_size=2)


class Prefixing(NoEdit):
    """A prompt editor in miniature (IKE prepends demonstrations the same way)."""

    def prepare_prompts(self, prompts):
        return [Prompt("nq question: " + p.text, p.target, p.image, p.kind) for p in prompts]


def test_editor_generate_goes_through_prepare_prompts(backbone, prompts):
    editor = attached(Prefixing(), backbone)
    rewritten = editor.prepare_prompts(prompts)
    assert editor.generate(prompts, MAX_NEW) == backbone.generate(rewritten, MAX_NEW)
    assert editor.generate(prompts, MAX_NEW) != backbone.generate(prompts, MAX_NEW)


# --- the Mirage case -------------------------------------------------------------------------

TARGET = "red"


def _record(image: LazyImage) -> EditRecord:
    return EditRecord(src="What colour is the square?", pred="blue", alt=TARGET,
                      rephrase="Which colour is the square?", image=image, image_rephrase=image,
                      loc="nq question: a photo of", loc_ans="green", m_loc=image,
                      m_loc_q="What?", m_loc_a="blue")


def _teacher_forced_accuracy(backbone: Backbone, prompt: Prompt) -> float:
    batch = backbone.prepare([prompt])
    with torch.no_grad():
        logits = backbone.forward(batch).logits
    predicted = backbone.target_logits(batch, logits).argmax(-1)
    return (predicted == batch.target_ids()).float().mean().item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mirage_ft_without_end_token_runs_on_past_the_target(family, images):
    """Same seed, same edit, two settings of append_eos. Without the end token, teacher-forced
    Rel (token accuracy) is 100% but greedy generation continues after "red"; with it, the answer
    is exactly "red". Restore is bit-identical in both."""
    generated = {}
    for append_eos in (False, True):
        backbone = build(family)  # seeded: the same random model both times
        before = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
        record = _record(images[0])
        rel = edit_prompts(record, PromptTemplates())[0]
        # the unedited random model does not already answer the target
        assert answer_exact(backbone.generate([rel], MAX_NEW)[0], TARGET) == 0.0
        torch.manual_seed(0)
        editor = attached(FineTune(layers=[-2, -1], lr=2e-2, steps=60, early_stop_loss=None,
                                   append_eos=append_eos), backbone)
        assert editor.edit([record]).ok
        assert _teacher_forced_accuracy(backbone, rel) == 1.0  # Rel = 100%, both settings
        generated[append_eos] = generate_answers(editor, [rel], MAX_NEW, batch_size=1)[0]
        editor.restore()
        after = backbone.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())

    runs_on, stops = generated[False], generated[True]
    # the answer begins with the target and does not stop there: exact match fails
    assert normalize_answer(runs_on).startswith(TARGET)
    assert normalize_answer(runs_on) != TARGET, runs_on
    assert answer_exact(runs_on, TARGET) == 0.0
    assert stops == TARGET and answer_exact(stops, TARGET) == 1.0


@pytest.mark.parametrize("family, decoded, answer", [
    ("blip2", " red\nQuestion: what", "red"),            # OPT ends an answer with a line break
    ("minigpt4", " red###Human: what", "red"),           # Vicuna ends its turn with "###"
    ("minigpt4", "###Assistant: red###Human:", "red"),   # EasyEdit's template has no marker
    ("llava", " red square ", "red square"),
])
def test_the_families_end_of_answer_markers_are_cut(family, decoded, answer, prompts, monkeypatch):
    backbone = build(family)
    monkeypatch.setattr(backbone.tokenizer, "batch_decode",
                        lambda ids, **kwargs: [decoded] * len(ids))
    assert backbone.generate(prompts[:2], max_new_tokens=2) == [answer, answer]
