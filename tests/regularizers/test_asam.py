"""FT + ASAM through the Regularizer seam, on the random tiny BLIP-2 (no knowledge needed)."""

import pytest

from mmke.editors.base import NoEdit
from mmke.errors import ConfigError
from mmke.regularizers.asam import ASAM
from tests.conftest import cache_dir
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


def simcse(**settings) -> ASAM:
    return ASAM(variants="simcse", cache_dir=str(cache_dir()), **settings)


def test_simcse_needs_a_cache_dir():
    with pytest.raises(ConfigError, match="cache_dir"):
        ASAM(variants="simcse")


def test_simcse_retrieves_the_nearest_train_phrasings(random_tiny, vqa_source):
    """The variants are the train phrasings a hand-computed cosine ranking puts first, asked
    about the edit's picture with the new target, never the edit prompt itself."""
    import torch
    from mmke.data.record import Prompt
    from mmke.regularizers.base import edit_request
    reg = simcse(n_variants=3)
    editor = seam.make_ft(random_tiny, vqa_source, reg, steps=1)
    assert reg.paraphrases is not None
    record = vqa_source.records("eval", limit=1)[0]
    request = edit_request(record, vqa_source.templates)
    found = reg.paraphrases.variants(request, 3)
    texts, bank = reg.paraphrases.bank["vqa"]
    query = reg.paraphrases.encoder.encode([request.prompt.text])[0]
    scores = torch.nn.functional.normalize(bank, dim=1) @ query
    scored = {t for t in texts if request.is_scored(Prompt(t, record.alt, record.image))}
    ranked = [texts[i] for i in scores.argsort(descending=True).tolist()
              if texts[i] != request.prompt.text and texts[i] not in scored][:3]
    own = vqa_source.templates.edit.format(record.rephrase)
    if own in texts:  # a wording the train split shares: scored for this record, never picked
        assert own in scored
    assert [p.text for p in found] == ranked
    assert all(p.image == record.image and p.target == record.alt for p in found)
    assert not any(request.is_scored(p) for p in found)
    editor.edit([record])
    assert reg.retrieved == [ranked] and reg.last_terms["align"] > 0
    editor.restore()


def test_simcse_restore_is_bit_identical_and_never_leaks(random_tiny, vqa_source, monkeypatch):
    seam.restore_is_bit_identical(random_tiny, vqa_source, simcse)
    seam.no_scored_prompt_reaches_the_edit(random_tiny, vqa_source, simcse, monkeypatch)


@pytest.mark.parametrize("bad", [dict(variants="paraphrase"), dict(align="kl"), dict(eps=0),
                                 dict(norm="l1"), dict(n_variants=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        ASAM(**bad)


def test_reg_asam_runs_from_the_config(pretrained, tmp_path):
    summary = seam.runs_from_the_config("asam", tmp_path)
    assert summary["leaky"] is False and "leaked" not in summary
