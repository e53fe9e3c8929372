"""Protocols and the batched evaluator on the pretrained tiny BLIP-2."""

import pytest

from mmke.editors.base import NoEdit
from mmke.editors.ft import FineTune
from mmke.errors import ConfigError
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.sequential import Sequential
from mmke.protocols.single import SingleEdit


@pytest.fixture
def records(vqa_source):
    return vqa_source.records("eval", limit=10)


def attached(editor, backbone, source):
    editor.attach(backbone, source.templates)
    return editor


def test_unedited_model_has_perfect_locality(pretrained, vqa_source, records):
    for spec in (MetricSpec(), MetricSpec(locality="kl", loc_positions="first")):
        rows = SingleEdit().run(attached(NoEdit(), pretrained, vqa_source),
                                Evaluator(spec, vqa_source.templates), records, lambda r: None, False)
        assert all(r["t_loc"] == pytest.approx(100.0) and r["m_loc"] == pytest.approx(100.0)
                   for r in rows)
        assert sum(r["rel"] for r in rows) / len(rows) < 50  # alt is a counterfactual


def test_one_forward_per_model_state(pretrained, vqa_source, records):
    evaluator = Evaluator(MetricSpec(batch_size=64), vqa_source.templates)
    SingleEdit().run(attached(FineTune(), pretrained, vqa_source), evaluator, records,
                     lambda r: None, False)
    # 10 records: one forward for all pre-edit references, then one per edited state
    assert evaluator.forwards == 1 + len(records)


def test_batching_does_not_change_metrics(pretrained, vqa_source, records):
    editor = attached(NoEdit(), pretrained, vqa_source)
    wide = Evaluator(MetricSpec(batch_size=64), vqa_source.templates)
    narrow = Evaluator(MetricSpec(batch_size=5), vqa_source.templates)
    a = wide.evaluate(editor, records, wide.references(pretrained, records))
    b = narrow.evaluate(editor, records, narrow.references(pretrained, records))
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-6)
    assert wide.forwards == 2 and narrow.forwards == 5 + 10


def test_sequential_evaluates_streams_after_T_edits(pretrained, vqa_source, records):
    before = {k: v.clone() for k, v in pretrained.model.state_dict().items()}
    evaluator = Evaluator(MetricSpec(), vqa_source.templates)
    rows = Sequential(T=5).run(attached(FineTune(), pretrained, vqa_source), evaluator, records,
                               lambda r: None, False)
    assert [(r["stream"], r["position"]) for r in rows] == [(s, p) for s in range(2) for p in range(5)]
    assert evaluator.forwards == 1 + 2  # references once, then one forward per stream of 5
    assert all(r["rel"] is not None for r in rows)
    after = pretrained.model.state_dict()
    assert all(after[k].equal(v) for k, v in before.items())


def test_sequential_needs_whole_streams(pretrained, vqa_source, records):
    with pytest.raises(ConfigError, match="multiple of protocol.T"):
        Sequential(T=3).run(attached(NoEdit(), pretrained, vqa_source),
                            Evaluator(MetricSpec(), vqa_source.templates), records,
                            lambda r: None, False)


def test_single_protocol_refuses_T():
    with pytest.raises(ValueError, match="protocol.T must be 1"):
        SingleEdit(T=5)
