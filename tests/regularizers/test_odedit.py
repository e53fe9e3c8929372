"""FT + ODEdit through the Regularizer seam, on the random tiny BLIP-2 (no knowledge needed):
restore, determinism, NaN handling, refusal by editor=none, and no leakage of scored prompts."""

import pytest

from mmke.editors.base import NoEdit
from mmke.errors import ConfigError
from mmke.regularizers.odedit import ODEdit
from tests.regularizers import seam_helpers as seam

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [dict(), dict(gen_align="mmd_m_rbf"), dict(gen_align="contrast"),
            dict(gen_align="mmd_s_linear", tv_lambda=1e-2), dict(variant="no_rel"),
            dict(variant="no_loc"), dict(variant="no_gen"), dict(tv_persist="edit")]


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) or "default" for s in SETTINGS])
def test_restore_is_bit_identical(random_tiny, vqa_source, settings):
    seam.restore_is_bit_identical(random_tiny, vqa_source, lambda: ODEdit(**settings))


def test_same_seed_same_numbers(random_tiny, vqa_source):
    seam.same_seed_same_numbers(random_tiny, vqa_source, ODEdit)


@pytest.mark.parametrize("term", ["mmke.regularizers.odedit.generality_risk",
                                  "mmke.regularizers.odedit.kl_post_pre_logprobs"])
def test_nan_in_a_term_is_a_failed_edit(random_tiny, vqa_source, monkeypatch, term):
    seam.nan_term_fails_the_edit(random_tiny, vqa_source, ODEdit, monkeypatch, term)


def test_default_never_passes_a_scored_prompt(random_tiny, vqa_source, monkeypatch):
    extra = seam.no_scored_prompt_reaches_the_edit(random_tiny, vqa_source, ODEdit, monkeypatch)
    assert extra > 0, "ODEdit drew no out-of-scope samples or neighbours at all"


def test_editor_none_refuses_it():
    with pytest.raises(TypeError, match="cannot be plugged in"):
        NoEdit(regularizer=ODEdit()).attach(None, None)  # refused before the backbone is read


def test_it_needs_the_train_split(random_tiny, vqa_source):
    from mmke.editors.ft import FineTune
    with pytest.raises(ConfigError, match="train"):
        FineTune(regularizer=ODEdit()).attach(random_tiny, vqa_source.templates)


def test_the_lambda_network_persists_over_a_stream_and_restarts_on_restore(random_tiny, vqa_source):
    editor = seam.make_ft(random_tiny, vqa_source, ODEdit())
    first, second = vqa_source.records("eval", limit=2)
    editor.edit([first])
    lam = editor.regularizer.lam
    editor.edit([second])
    assert editor.regularizer.lam is lam  # tv_persist=stream
    editor.restore()
    assert editor.regularizer.lam is None


@pytest.mark.parametrize("bad", [dict(variant="w/o"), dict(gen_align="mmd"), dict(tv_lambda="big"),
                                 dict(tv_persist="forever")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        ODEdit(**bad)


def test_reg_odedit_runs_from_the_config(pretrained, tmp_path):
    summary = seam.runs_from_the_config("odedit", tmp_path)
    assert summary["regularizer"]["out_of_scope"] == "train"
    assert summary["leaky"] is False and "leaked" not in summary
