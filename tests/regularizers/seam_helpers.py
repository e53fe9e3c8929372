"""Shared checks for regularizers plugged into FT (tests/regularizers/test_odedit.py, test_asam.py)."""

from __future__ import annotations

import math

import torch

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


def no_scored_prompt_reaches_the_edit(backbone, source, make_reg, monkeypatch) -> int:
    """Record every prompt tokenized while editing; none may be a prompt the evaluator scores for
    the record (other than the edit prompt itself, which FT trains on). Returns how many
    prompts the regularizer added, so a test can check it drew any."""
    seen: list = []
    real = type(backbone).encode

    def spy(self, prompt, *args, **kwargs):
        seen.append(prompt)
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(type(backbone), "encode", spy)
    evaluator = Evaluator(MetricSpec(), source.templates)
    editor = make_ft(backbone, source, make_reg(), steps=2)
    extra = 0
    for record in source.records("eval", limit=10):
        seen.clear()
        editor.edit([record])
        editor.restore()
        items = evaluator.items(record)
        rel = next(i.prompt for i in items if i.metric == "rel")
        scored = {prompt_key(i.prompt) for i in items if i.metric != "rel"}
        leaked = [p for p in seen if prompt_key(p) in scored]
        assert leaked == [], f"scored prompts reached the edit of {record.uid}: {leaked}"
        extra += sum(prompt_key(p) != prompt_key(rel) for p in seen)
    return extra


def runs_from_the_config(reg: str, tmp_path) -> dict:
    """``python run.py reg=<reg>`` on the pretrained tiny BLIP-2, two edits, through ``run``."""
    from mmke.runner import run
    from tests.conftest import compose_config
    cfg = compose_config([f"reg={reg}", "n_edits=2", "cpu_threads=1", "logger=none"])
    summary = run(cfg, run_dir=tmp_path / "run")
    assert summary["n_edits"] == 2 and summary["n_failed"] == 0
    assert summary["rel"] >= 50.0  # the regularized edit still flips the answer
    assert summary["regularizer"], "the summary records where the regularizer's samples came from"
    return summary
