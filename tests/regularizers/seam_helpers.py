"""Shared checks for regularizers plugged into FT (tests/regularizers/test_odedit.py, test_asam.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from mmke.data.record import Prompt
from mmke.editors.ft import FineTune
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.regularizers.base import prompt_key


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    after = model.state_dict()
    return [k for k in before if not torch.equal(after[k], before[k])]


def make_ft(backbone, source, regularizer, steps: int = 4) -> FineTune:
    train = source.records("train")
    editor = FineTune(steps=steps, early_stop_loss=None, regularizer=regularizer)
    editor.attach(backbone, source.templates, train_records=lambda: train)
    return editor


def restore_is_bit_identical(backbone, source, make_reg) -> None:
    before = state(backbone.model)
    editor = make_ft(backbone, source, make_reg())
    records = source.records("eval", limit=3)
    for record in records:  # single edits
        assert editor.edit([record]).ok
        editor.restore()
    for record in records:  # a stream
        assert editor.edit([record]).ok
    editor.restore()
    assert changed(backbone.model, before) == []
    assert all(p.requires_grad for p in backbone.model.parameters())


def same_seed_same_numbers(backbone, source, make_reg) -> None:
    record = source.records("eval", limit=1)
    results = []
    for _ in range(2):
        editor = make_ft(backbone, source, make_reg())
        outcome = editor.edit(record)
        params = {n: p.detach().clone() for n, p in editor._edited_parameters().items()}
        results.append((outcome.final_loss, params, dict(editor.regularizer.last_terms)))
        editor.restore()
    (loss_a, p_a, t_a), (loss_b, p_b, t_b) = results
    assert loss_a == loss_b and t_a == t_b
    assert all(torch.equal(p_a[n], p_b[n]) for n in p_a)


def nan_term_fails_the_edit(backbone, source, make_reg, monkeypatch, target: str) -> None:
    """Replace one regularizer term (``module.function``) by NaN: the edit is reported failed and
    the weights are back as before."""
    module, name = target.rsplit(".", 1)
    import importlib
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, **k: real(*a, **k) * float("nan"))
    before = state(backbone.model)
    editor = make_ft(backbone, source, make_reg())
    outcome = editor.edit(source.records("eval", limit=1))
    assert not outcome.ok and math.isnan(outcome.final_loss)
    assert "non-finite" in outcome.message
    assert changed(backbone.model, before) == []
    editor.restore()


@dataclass
class EditSeen:
    """What one edit of ``record`` showed the model and the regularizer."""

    record: object
    requests: list          # the EditRequests the regularizer's begin() received
    encoded: list           # every prompt tokenized while editing (editor and regularizer)
    scored: list            # every prompt the evaluator scores for the record but Rel's
    rel: object             # the edit prompt itself (FT trains on it)


def what_the_edit_sees(backbone, source, make_reg, monkeypatch, n_records: int = 10,
                       make_editor=make_ft) -> list[EditSeen]:
    """Edit ``n_records`` eval records one by one with ``make_editor`` (default FT) +
    ``make_reg()``, recording every prompt the backbone tokenizes (``encode``) and the requests
    handed to the regularizer's ``begin``. ``make_editor(backbone, source, regularizer, steps)``
    builds an attached editor."""
    encoded: list = []
    requests: list = []
    real_encode = type(backbone).encode

    def spy_encode(self, prompt, *args, **kwargs):
        encoded.append(prompt)
        return real_encode(self, prompt, *args, **kwargs)

    monkeypatch.setattr(type(backbone), "encode", spy_encode)
    regularizer = make_reg()
    real_begin = regularizer.begin

    def spy_begin(reqs, context):
        requests.extend(reqs)
        return real_begin(reqs, context)

    monkeypatch.setattr(regularizer, "begin", spy_begin)
    evaluator = Evaluator(MetricSpec(), source.templates)
    editor = make_editor(backbone, source, regularizer, steps=2)
    seen = []
    for record in source.records("eval", limit=n_records):
        encoded.clear()
        requests.clear()
        assert editor.edit([record]).ok
        editor.restore()
        items = evaluator.items(record)
        seen.append(EditSeen(record, list(requests), list(encoded),
                             [i.prompt for i in items if i.metric != "rel"],
                             next(i.prompt for i in items if i.metric == "rel")))
    return seen


def no_scored_prompt_reaches_the_edit(backbone, source, make_reg, monkeypatch,
                                      make_editor=make_ft) -> int:
    """No prompt the evaluator scores for a record (other than the edit prompt itself, which the
    editor trains on) reaches its edit: not as a prompt the backbone tokenizes (text and
    picture), not as a picture only (its image rephrase or a locality picture under any
    question), and not inside the edit requests the regularizer receives (they carry the edit
    prompt alone). ``make_editor``: as in ``what_the_edit_sees``. Returns how many prompts the
    editor and regularizer added, so a test can check they drew any."""
    extra = 0
    for edit in what_the_edit_sees(backbone, source, make_reg, monkeypatch,
                                   make_editor=make_editor):
        uid = edit.record.uid
        scored = {prompt_key(p) for p in edit.scored}
        leaked = [p for p in edit.encoded if prompt_key(p) in scored]
        assert leaked == [], f"scored prompts reached the edit of {uid}: {leaked}"
        pictures = {_path(p) for p in edit.scored} - {_path(edit.rel), None}
        shown = [p for p in edit.encoded if _path(p) in pictures]
        assert shown == [], f"pictures of scored prompts reached the edit of {uid}: {shown}"
        assert edit.requests, "the regularizer's begin() was never called"
        for request in edit.requests:
            assert prompt_key(request.prompt) == prompt_key(edit.rel)
            assert request.revealed == (), f"request of {uid} reveals {request.revealed}"
            carried = [v for f in fields(request) if f.name != "prompt"
                       for v in _prompts_in(getattr(request, f.name))]
            assert carried == [], f"the request of {uid} carries prompts: {carried}"
        extra += sum(prompt_key(p) != prompt_key(edit.rel) for p in edit.encoded)
    return extra


def _path(prompt) -> str | None:
    return None if prompt.image is None else str(prompt.image.path)


def _prompts_in(value) -> list[Prompt]:
    if isinstance(value, Prompt):
        return [value]
    if isinstance(value, (tuple, list, set, frozenset)):
        return [p for v in value for p in _prompts_in(v)]
    return []


def runs_from_the_config(reg: str, tmp_path, overrides: tuple[str, ...] = ()) -> dict:
    """``python run.py reg=<reg> <overrides>`` on the pretrained tiny BLIP-2, two edits,
    through ``run``."""
    from mmke.runner import run
    from tests.conftest import compose_config
    cfg = compose_config([f"reg={reg}", "n_edits=2", "cpu_threads=1", "logger=none",
                          *overrides])
    summary = run(cfg, run_dir=tmp_path / "run")
    assert summary["n_edits"] == 2 and summary["n_failed"] == 0
    assert summary["rel"] >= 50.0  # the regularized edit still flips the answer
    assert summary["regularizer"], "the summary records where the regularizer's samples came from"
    return summary
