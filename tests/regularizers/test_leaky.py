"""The leaky opt-ins (ODEdit ``neighbours=record_rephrase``, ``out_of_scope=record_locality``):
they hand the edit the record's own scored prompts, are flagged in the summaries, and the no-leak
check of the default settings (seam_helpers.no_scored_prompt_reaches_the_edit) catches them."""

import json

import pytest

import mmke.editors.ft as ft_module
from mmke.data.record import Prompt
from mmke.errors import ConfigError
from mmke.regularizers.asam import ASAM
from mmke.regularizers.base import NoRegularizer, Regularizer, prompt_key
from mmke.regularizers.odedit import ODEdit
from tests.regularizers import seam_helpers as seam

pytestmark = pytest.mark.usefixtures("one_thread")

LEAKY = [(dict(neighbours="record_rephrase"), ("t_gen",)),  # mmd_s_rbf: one rephrase prompt
         (dict(neighbours="record_rephrase", gen_align="mmd_m_rbf"), ("t_gen", "m_gen")),
         (dict(out_of_scope="record_locality"), ("t_loc", "m_loc")),
         (dict(neighbours="record_rephrase", out_of_scope="record_locality", gen_align="contrast",
               variant="no_loc"), ("t_gen", "m_gen", "t_loc", "m_loc"))]
LEAKY_IDS = [",".join(kinds) for _, kinds in LEAKY]


@pytest.mark.parametrize("settings, kinds", LEAKY, ids=LEAKY_IDS)
def test_the_leaky_setting_passes_exactly_the_records_own_prompts(random_tiny, vqa_source,
                                                                  monkeypatch, settings, kinds):
    seen = seam.what_the_edit_sees(random_tiny, vqa_source, lambda: ODEdit(**settings),
                                   monkeypatch, n_records=3)
    for edit in seen:
        encoded = {prompt_key(p) for p in edit.encoded}
        wanted = {prompt_key(p) for p in edit.scored if p.kind in kinds}
        others = {prompt_key(p) for p in edit.scored if p.kind not in kinds}
        assert len(wanted) == len(kinds) and wanted <= encoded, edit.record.uid
        assert not others & encoded, f"{edit.record.uid}: more than {kinds} leaked"
        assert [p.kind for r in edit.requests for p in r.revealed] == list(kinds)


@pytest.mark.parametrize("settings, kinds", LEAKY, ids=LEAKY_IDS)
def test_the_no_leak_check_fails_on_the_leaky_setting(random_tiny, vqa_source, monkeypatch,
                                                     settings, kinds):
    with pytest.raises(AssertionError, match="scored prompts reached the edit"):
        seam.no_scored_prompt_reaches_the_edit(random_tiny, vqa_source,
                                               lambda: ODEdit(**settings), monkeypatch)


class _PictureLeak(Regularizer):
    """Asks its own question about the record's image rephrase: no scored prompt, but a picture
    that only scored prompts show."""

    reveals = frozenset({"m_gen"})

    def begin(self, requests, context) -> None:
        for request in requests:
            (m_gen,) = request.revealed_of(("m_gen",))
            self.backbone.prepare([Prompt("Question: what is it? Short answer:", "x",
                                          m_gen.image, "t_gen")])


class _RequestLeak(Regularizer):
    """Is handed the record's text-locality prompt and never uses it."""

    reveals = frozenset({"t_loc"})


@pytest.mark.parametrize("make_reg, message", [(_PictureLeak, "pictures of scored prompts"),
                                               (_RequestLeak, "reveals")],
                         ids=["picture", "request"])
def test_the_no_leak_check_fails_on_a_picture_or_a_request(random_tiny, vqa_source, monkeypatch,
                                                           make_reg, message):
    with pytest.raises(AssertionError, match=message):
        seam.no_scored_prompt_reaches_the_edit(random_tiny, vqa_source, make_reg, monkeypatch)


def test_the_summaries_record_what_leaked():
    reg = ODEdit(neighbours="record_rephrase", gen_align="mmd_m_rbf")
    assert reg.summary()["neighbours"] == "record:t_gen,m_gen"
    assert reg.summary()["leaked"] == "t_gen,m_gen"
    assert reg.leak_summary() == {"leaky": True, "leaked": ["t_gen", "m_gen"]}
    reg = ODEdit(out_of_scope="record_locality")
    assert reg.summary()["out_of_scope"] == "record:t_loc,m_loc"
    assert reg.leak_summary() == {"leaky": True, "leaked": ["t_loc", "m_loc"]}
    # the default, and a leaky source whose term the variant switches off, read nothing
    clean = [ODEdit(), ODEdit(neighbours="record_rephrase", variant="no_gen"),
             ODEdit(out_of_scope="record_locality", variant="no_loc"), ASAM(), NoRegularizer()]
    for reg in clean:
        assert not reg.reveals and reg.leak_summary() == {"leaky": False}
        assert "leaked" not in reg.summary()
    unused = ODEdit(neighbours="record_rephrase", variant="no_gen")
    assert unused.summary()["neighbours"] == "unused"


@pytest.mark.parametrize("setting, value", [("neighbours", "record"), ("out_of_scope", "eval")])
def test_bad_sources_are_refused_with_the_allowed_values(setting, value):
    with pytest.raises(ConfigError, match=f"reg.{setting}=.*record_"):
        ODEdit(**{setting: value})


def test_an_editor_that_does_not_hand_over_the_prompts_is_refused(random_tiny, vqa_source,
                                                                   monkeypatch):
    real = ft_module.edit_requests
    monkeypatch.setattr(ft_module, "edit_requests",
                        lambda records, templates, reveal=(): real(records, templates))
    editor = seam.make_ft(random_tiny, vqa_source, ODEdit(neighbours="record_rephrase"))
    with pytest.raises(ConfigError, match="regularizer.reveals"):
        editor.edit(vqa_source.records("eval", limit=1))
    editor.restore()


def test_a_leaky_run_is_flagged_in_its_summary(pretrained, tmp_path):
    summary = seam.runs_from_the_config("odedit", tmp_path, ("reg.neighbours=record_rephrase",))
    assert summary["leaky"] is True and summary["leaked"] == ["t_gen"]
    assert summary["regularizer"]["neighbours"] == "record:t_gen"
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored["leaky"] is True and stored["leaked"] == ["t_gen"]
