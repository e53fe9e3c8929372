"""The online protocol (M-ORE Eq. 14-18) on the pretrained tiny BLIP-2 with FT."""

import pytest

from mmke.data.prompts import edit_prompts
from mmke.editors.base import NoEdit
from mmke.editors.ft import FineTune
from mmke.errors import ConfigError
from mmke.evaluation.evaluator import METRICS, Evaluator
from mmke.evaluation.metrics import exp_neg_kl
from mmke.evaluation.names import final_key
from mmke.evaluation.scoring import Need, score_prompts
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.online import Online
from mmke.protocols.sequential import Sequential
from mmke.summary import summarize

KL = MetricSpec(locality="kl", loc_positions="first")  # eval=more


@pytest.fixture
def stream(vqa_source):
    return vqa_source.records("eval", limit=4)


@pytest.fixture
def ft(pretrained, vqa_source):
    editor = FineTune()
    editor.attach(pretrained, vqa_source.templates)
    yield editor
    editor.restore()


def _next_token_logprobs(backbone, record, templates):
    """The T-Loc and M-Loc prompts' next-token distributions on the model as it is now."""
    t_loc, m_loc = edit_prompts(record, templates)[3:]
    outs = score_prompts(backbone.forward, backbone, [t_loc, m_loc],
                         [Need(0, True), Need(0, True)], "first")
    return [o.logprobs for o in outs]


def test_locality_of_each_step_is_against_the_model_just_before_it(pretrained, vqa_source,
                                                                   stream, ft):
    # by hand: edit the stream with FT, reading each record's locality prompts before and after
    expected, against_unedited = [], []
    unedited = [_next_token_logprobs(pretrained, r, vqa_source.templates) for r in stream]
    for record, initial in zip(stream, unedited):
        before = _next_token_logprobs(pretrained, record, vqa_source.templates)
        assert ft.edit([record]).ok
        after = _next_token_logprobs(pretrained, record, vqa_source.templates)
        expected.append([100 * exp_neg_kl(a, b) for a, b in zip(after, before)])
        against_unedited.append([100 * exp_neg_kl(a, b) for a, b in zip(after, initial)])
    ft.restore()
    rows = Online(T=len(stream)).run(ft, Evaluator(KL, vqa_source.templates), stream,
                                     lambda r: None, False)
    for row, (t_loc, m_loc) in zip(rows, expected):
        assert row["t_loc"] == pytest.approx(t_loc, abs=1e-3)
        assert row["m_loc"] == pytest.approx(m_loc, abs=1e-3)
    # θ_{t-1} is not θ_0 after the first edit: the two readings differ somewhere
    assert any(abs(e[i] - u[i]) > 1e-2 for e, u in zip(expected[1:], against_unedited[1:])
               for i in range(2))


def test_final_scores_equal_the_sequential_protocol_on_the_same_stream(pretrained, vqa_source,
                                                                      stream, ft):
    online = Online(T=len(stream)).run(ft, Evaluator(KL, vqa_source.templates), stream,
                                       lambda r: None, False)
    sequential = Sequential(T=len(stream)).run(ft, Evaluator(KL, vqa_source.templates), stream,
                                               lambda r: None, False)
    for o, s in zip(online, sequential):
        for metric in METRICS:
            assert o[final_key(metric)] == pytest.approx(s[metric], abs=1e-3)
    # the last edit's step scores are read on the final model too
    assert online[-1]["rel"] == pytest.approx(online[-1]["rel_final"])
    summary = summarize(online, 1.0, 0)
    assert {final_key(m) for m in METRICS} <= summary.keys()


def test_forwards_restore_and_stream_layout(pretrained, vqa_source, stream, ft):
    before = {k: v.clone() for k, v in pretrained.model.state_dict().items()}
    evaluator = Evaluator(KL, vqa_source.templates)
    rows = Online(T=2).run(ft, evaluator, stream, lambda r: None, False)
    assert [(r["stream"], r["position"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # θ_0 references once; per step one reference and one scoring forward; one per stream end
    assert evaluator.forwards == 1 + 2 * len(stream) + 2
    after = pretrained.model.state_dict()
    assert all(after[k].equal(v) for k, v in before.items())


def test_unedited_model_keeps_everything_under_both_conventions(pretrained, vqa_source, stream):
    editor = NoEdit()
    editor.attach(pretrained, vqa_source.templates)
    for spec in (MetricSpec(), KL):
        rows = Online(T=2).run(editor, Evaluator(spec, vqa_source.templates), stream,
                               lambda r: None, False)
        for row in rows:
            for key in ("t_loc", "m_loc", "t_loc_final", "m_loc_final"):
                assert row[key] == pytest.approx(100.0)
            assert row["rel"] == pytest.approx(row["rel_final"])


def test_streams_must_be_whole(pretrained, vqa_source, stream):
    editor = NoEdit()
    editor.attach(pretrained, vqa_source.templates)
    with pytest.raises(ConfigError, match="multiple of protocol.T"):
        Online(T=3).run(editor, Evaluator(KL, vqa_source.templates), stream, lambda r: None, False)
