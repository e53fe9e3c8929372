"""General-capability probes from the protocols (M-ORE Figure 5) on the pretrained tiny BLIP-2."""

from __future__ import annotations

import json

import pytest
import torch

from mmke.backbones.base import IGNORE_INDEX
from mmke.editors.base import NoEdit
from mmke.editors.ft import FineTune
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.probe_sets import load_probe_set
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.online import Online
from mmke.protocols.sequential import Sequential
from mmke.protocols.single import SingleEdit
from mmke.runner import run
from tests.conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = MetricSpec(probes="miniworld", probes_every=2, probes_limit=6)


@pytest.fixture
def evaluator(vqa_source):
    return Evaluator(SPEC, vqa_source.templates,
                     load_probe_set(SPEC, vqa_source, vqa_source.templates))


def attached(editor, backbone, source):
    editor.attach(backbone, source.templates)
    return editor


def by_hand(backbone, prompts) -> float:
    """Exact-match accuracy (%) of ``prompts``, one unbatched forward each."""
    right = 0
    with torch.inference_mode():
        for prompt in prompts:
            batch = backbone.prepare([prompt])
            logits = backbone.forward(batch).logits[0, :-1]
            labels = batch.labels[0, 1:]
            at = labels != IGNORE_INDEX
            right += bool((logits[at].argmax(-1) == labels[at]).all())
    return 100.0 * right / len(prompts)


def test_probes_before_any_edit_equal_the_unedited_model(pretrained, vqa_source, evaluator):
    rows: list[dict] = []
    records = vqa_source.records("eval", limit=2)
    editor = attached(FineTune(), pretrained, vqa_source)
    SingleEdit().run(editor, evaluator, records, lambda r: None, False, probe_sink=rows.append)
    assert [r["edits"] for r in rows] == [0] * 4  # single: before editing only
    for row, category in zip(rows, evaluator.probes.categories):
        assert row["category"] == category.name and row["n"] == 6
        assert row["accuracy"] == pytest.approx(by_hand(pretrained, category.prompts))
    assert any(r["accuracy"] > 0 for r in rows)  # the tiny model can answer its world
    assert evaluator.probe_forwards == 1  # 24 probes in one batch, counted apart
    # a shard that does not start the run leaves the unedited probe to the first one
    later: list[dict] = []
    SingleEdit().run(editor, evaluator, records, lambda r: None, False, start=2,
                     probe_sink=later.append)
    assert later == []


def test_noedit_probes_are_constant_along_a_stream(pretrained, vqa_source, evaluator):
    rows: list[dict] = []
    Sequential(T=3).run(attached(NoEdit(), pretrained, vqa_source), evaluator,
                        vqa_source.records("eval", limit=3), lambda r: None, False,
                        probe_sink=rows.append)
    # before, after 2 edits (every K=2), after 3 (end of stream)
    assert [(r["stream"], r["edits"]) for r in rows[::4]] == [(None, 0), (0, 2), (0, 3)]
    for category in ("existence", "count", "position", "colour"):
        assert len({r["accuracy"] for r in rows if r["category"] == category}) == 1


def test_ft_changes_the_after_edit_probes(pretrained, vqa_source, evaluator):
    rows: list[dict] = []
    before = {k: v.clone() for k, v in pretrained.model.state_dict().items()}
    Online(T=4).run(attached(FineTune(), pretrained, vqa_source), evaluator,
                    vqa_source.records("eval", limit=4), lambda r: None, False,
                    probe_sink=rows.append)
    assert [r["edits"] for r in rows[::4]] == [0, 2, 4]
    unedited = [r["accuracy"] for r in rows if r["edits"] == 0]
    at_end = [r["accuracy"] for r in rows if r["edits"] == 4]
    assert unedited != at_end
    after = pretrained.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # probes edit nothing


def test_probes_jsonl_and_summary(tmp_path):
    cfg = compose_config(["protocol=sequential", "protocol.T=2", "n_edits=2", "eval=more",
                          "eval.probes=miniworld", "eval.probes_limit=4", "resume=false"])
    summary = run(cfg, tmp_path / "run")
    lines = (tmp_path / "run" / "probes.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["edits"], r["category"]) for r in rows[:5]] == [
        (0, "existence"), (0, "count"), (0, "position"), (0, "colour"), (2, "existence")]
    assert len(rows) == 8 and all(r["n"] == 4 for r in rows)
    probes = summary["probes"]
    assert probes["set"] == "miniworld"
    for when, edits in (("before", 0), ("end", 2)):
        assert probes[f"accuracy_{when}"] == {r["category"]: pytest.approx(r["accuracy"])
                                              for r in rows if r["edits"] == edits}
    assert "mme_score_before" not in probes  # one question per picture: no accuracy+
