"""IKE: retrieval, the prompts it writes, streams, restore, and the context limit, on the real
tiny BLIP-2 and the real all-MiniLM-L6-v2."""

import copy

import pytest
import torch

from mmke.data.demonstrations import IKEFormat, demonstration_bank, edit_fact
from mmke.data.prompts import edit_prompts
from mmke.data.record import Prompt
from mmke.editors.ike import IKE, record_identity
from mmke.encoders import SentenceEncoder, nearest
from mmke.errors import ConfigError
from mmke.regularizers.odedit import ODEdit
from mmke.config import build
from tests.conftest import cache_dir, compose_config
from tests.editors.conftest import state

N_TRAIN = 120  # a slice of the train split keeps the bank's first embedding in seconds


@pytest.fixture(scope="module")
def caption_source():
    return build(compose_config(["data=mini_caption"]).data)


@pytest.fixture(scope="module")
def bank_records(vqa_source):
    return vqa_source.records("train")[:N_TRAIN]


def attached(pretrained, source, train, **settings) -> IKE:
    editor = IKE(cache_dir=str(cache_dir()), encoder_device="cpu", progress=False,
                 **{"k": 4, **settings})
    editor.attach(pretrained, source.templates, train_records=lambda: train)
    return editor


def distinct_questions(records, n):
    """``n`` records whose edit questions differ (the mini world repeats questions)."""
    seen, picked = set(), []
    for r in records:
        if r.src not in seen:
            seen.add(r.src)
            picked.append(r)
    return picked[:n]


def test_retrieval_is_the_hand_computed_cosine_ranking(pretrained, vqa_source, bank_records):
    editor = attached(pretrained, vqa_source, bank_records, k=5)
    record = vqa_source.records("eval", limit=1)[0]
    texts = [d.text for d in demonstration_bank(bank_records, vqa_source.templates, IKEFormat())]
    encoder = SentenceEncoder(cache_dir(), device="cpu", progress=False)
    bank = encoder.encode(texts)
    query = encoder.encode([editor.query_sentence(record)])[0]
    cosine = torch.nn.functional.cosine_similarity(bank, query[None], dim=1)
    expected = [texts[i] for i in cosine.argsort(descending=True)[:5].tolist()]
    assert editor.demonstrations([record])[0] == expected[::-1]  # most similar next to the query


def test_the_prompt_holds_the_new_fact_and_k_demonstrations(pretrained, vqa_source, bank_records):
    editor = attached(pretrained, vqa_source, bank_records, k=3)
    record = vqa_source.records("eval", limit=1)[0]
    before = state(pretrained.model)
    editor.edit([record])
    fact = edit_fact(record, vqa_source.templates, IKEFormat())
    prompts = edit_prompts(record, vqa_source.templates)
    for original, prepared in zip(prompts, editor.prepare_prompts(prompts)):
        # 3 demonstrations, the fact's copy line, the query: 5 facts written in all
        assert prepared.text.count("New Fact: ") == 3 + 2
        assert prepared.text.endswith(f"New Fact: {fact}\nPrompt: {original.text}")
        assert f"New Fact: {fact}\nPrompt: {fact}\n\n" in prepared.text
        assert (prepared.target, prepared.image, prepared.kind) == \
            (original.target, original.image, original.kind)
    after = state(pretrained.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no weight changed


def test_an_edit_of_a_train_record_never_reads_its_own_scored_prompts(pretrained, vqa_source,
                                                                       bank_records):
    editor = attached(pretrained, vqa_source, bank_records, k=6)
    record = bank_records[0]
    _, embeddings, rows = editor.bank()
    own = set(rows[record_identity(record)])
    assert len(own) == 3  # its copy, update and retain sentences are in the bank
    query = editor.encoder.encode([editor.query_sentence(record)])
    unguarded = set(nearest(query, embeddings, 6).indices[0].tolist())
    assert own & unguarded  # without the exclusion its own sentences would be retrieved
    assert not own & set(editor.retrieve([record], k=6)[0])


def test_restore_leaves_no_state(pretrained, vqa_source, bank_records):
    editor = attached(pretrained, vqa_source, bank_records)
    records = vqa_source.records("eval", limit=3)
    prompts = edit_prompts(records[0], vqa_source.templates)
    editor.edit(records)
    assert editor.prepare_prompts(prompts) != prompts
    editor.restore()
    assert editor.memory == [] and editor.prepare_prompts(prompts) == prompts


def test_a_stream_puts_the_nearest_facts_in_a_bounded_context(pretrained, vqa_source,
                                                              bank_records):
    editor = attached(pretrained, vqa_source, bank_records, k=2, stream_facts=2)
    records = distinct_questions(vqa_source.records("eval", limit=200), 6)
    for r in records:
        editor.edit([r])
    assert len(editor.memory) == 6
    for r in records:
        fact = edit_fact(r, vqa_source.templates, IKEFormat())
        rel = editor.prepare_prompts(edit_prompts(r, vqa_source.templates)[:1])[0]
        assert rel.text.endswith(f"New Fact: {fact}\nPrompt: {rel.text.rsplit('Prompt: ', 1)[1]}")
        # k demonstrations, two facts' copy lines, the query: never more, however long the stream
        assert rel.text.count("New Fact: ") == 2 + 2 + 1


def test_an_over_long_context_stops_the_run_and_names_the_largest_k(pretrained, caption_source):
    backbone = copy.deepcopy(pretrained)
    backbone.extend_context(256)  # a context a few demonstrations fit, but not 32
    train = caption_source.records("train")[:N_TRAIN]
    records = caption_source.records("eval", limit=5)
    editor = attached(backbone, caption_source, train, k=32)
    with pytest.raises(ConfigError, match=r"editor.k=32.*largest k that fits every record is (\d+)") \
            as err:
        editor.check_records(records)
    fits = int(err.value.args[0].split("fits every record is ")[1].split(";")[0])
    assert 0 < fits < 32
    attached(backbone, caption_source, train, k=fits).check_records(records)
    with pytest.raises(ConfigError):
        attached(backbone, caption_source, train, k=fits + 1).check_records(records)


def test_ike_refuses_a_regularizer(pretrained, vqa_source, bank_records):
    editor = IKE(cache_dir=str(cache_dir()), regularizer=ODEdit())
    with pytest.raises(ConfigError, match="reg=none"):
        editor.attach(pretrained, vqa_source.templates, train_records=lambda: bank_records)


def test_the_context_stage_lengthens_the_context_and_keeps_it_on_reload(tmp_path, pretrained):
    """``extend_context`` on OPT's learned positions: new rows start as copies of known ones,
    the old rows are untouched, and a longer prompt runs."""
    backbone = copy.deepcopy(pretrained)
    old = backbone.model.language_model.model.decoder.embed_positions.weight.detach().clone()
    backbone.extend_context(300)
    assert backbone.context_length == 300
    new = backbone.model.language_model.model.decoder.embed_positions.weight
    assert new.shape[0] == 302 and torch.equal(new[:old.shape[0]], old)
    assert torch.equal(new[old.shape[0]], old[2])  # tiled from the first real position
    batch = backbone.build_batch([Prompt("a photo of " * 60, "red circle")])
    assert batch.input_ids.shape[1] > 128
    assert torch.isfinite(backbone.forward(batch).logits).all()
