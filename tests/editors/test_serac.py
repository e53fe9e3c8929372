"""SERAC: the scope classifier separates in-scope from out-of-scope inputs; out-of-scope inputs
reach the unchanged backbone bit for bit; a short fit edits far better than no edit; restore
empties the memory and leaves the backbone as it was; a 20-edit stream runs; generation takes the
same route; the real-checkpoint loading path works on tiny saved models; regularizers are refused.

One short fit on the tiny BLIP-2 (the settings ``editor=serac backbone=tiny_blip2`` composes, with
fewer steps), on the train split without its last ``HELD_OUT`` records, is shared by the tests
that need trained networks. The contract tests build random tiny models in-process."""

import pytest
import torch
from transformers import (AutoTokenizer, DistilBertConfig, DistilBertModel, OPTConfig,
                          OPTForCausalLM)

from mmke.data.prompts import edit_prompts
from mmke.data.record import Prompt
from mmke.editors.base import NoEdit
from mmke.editors.serac import Serac, balanced_bce
from mmke.editors.serac_counterfactual import CounterfactualModel
from mmke.errors import ConfigError
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.sequential import Sequential
from mmke.protocols.single import SingleEdit
from mmke.regularizers.odedit import ODEdit
from mmke.sweep.fingerprint import hook_count, model_fingerprint
from mmke.backbones.tiny.tokenizer import train_tokenizer
from tests.backbones.families import build as build_random
from tests.conftest import cache_dir
from tests.editors.conftest import composed, single_edit_rel, state

pytestmark = pytest.mark.usefixtures("one_thread")

HELD_OUT = 200
#: the shared short fit: a fraction of the tiny default's steps
SHORT_FIT = {"steps": 120, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 1000, "seed": 0}


@pytest.fixture(scope="session")
def serac_backbone(pretrained):
    return pretrained


@pytest.fixture(scope="session")
def serac(serac_backbone, vqa_source, tmp_path_factory):
    """SERAC composed for the tiny BLIP-2, fitted briefly on the train split minus its last
    ``HELD_OUT`` records (those are the classifier test's held-out records)."""
    train = vqa_source.records("train")[:-HELD_OUT]
    editor = composed("serac", "tiny_blip2", training=SHORT_FIT, progress=False,
                      cache_dir=str(tmp_path_factory.mktemp("serac_cache")))
    editor.attach(serac_backbone, vqa_source.templates, train_records=lambda: train)
    # one thread, as the tests run (a session fixture is set up before the module's one_thread):
    # on a busy two-core machine a second torch thread spin-waits and the fit takes minutes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = editor.fit(train)
    finally:
        torch.set_num_threads(threads)
    assert report.trained_now and report.steps_run == SHORT_FIT["steps"]
    return editor


@pytest.fixture
def fresh(serac):
    """The shared editor with an empty memory before and after the test."""
    serac.restore()
    yield serac
    serac.restore()


def _scores(editor: Serac, edit: Prompt, prompts: list[Prompt]) -> list[float]:
    """g(edit, x) for each prompt, the edit alone in the memory."""
    editor.restore()
    editor.memory.keys.append(editor.networks.classifier([editor.scope_text(edit)])[0])
    editor.memory.contexts.append([])
    editor.memory.prompts.append(edit)
    scores, _ = editor.route([editor.scope_text(p) for p in prompts])
    editor.restore()
    return scores.tolist()


def test_the_classifier_separates_in_scope_from_out_of_scope_on_held_out_records(fresh,
                                                                                 vqa_source):
    """Held-out train records (not in the fit): the edit's own text rephrase and its train-split
    neighbours (the rephrases other train records give the same question) score g > 0.5; its
    text-locality prompt, its multimodal-locality prompt (when it asks another question) and the
    questions of other held-out records that ask something else score g < 0.5."""
    train = vqa_source.records("train")
    held_out, fitted = train[-HELD_OUT:][:60], train[:-HELD_OUT]
    templates = vqa_source.templates
    phrasings: dict[str, set[str]] = {}
    for r in fitted:
        phrasings.setdefault(r.src, {r.src}).add(r.rephrase)
    inside, outside = [], []
    for i, r in enumerate(held_out):
        rel, t_gen, _, t_loc, m_loc = edit_prompts(r, templates)
        same = phrasings[r.src]
        neighbours = [Prompt(templates.edit.format(q), r.alt, r.image) for q in sorted(same)]
        others = [edit_prompts(o, templates)[0] for o in held_out[i + 1:i + 6]
                  if o.src not in same and o.rephrase not in same]
        out = [t_loc] + ([m_loc] if r.m_loc_q not in same else []) + others
        scores = _scores(fresh, rel, [t_gen, *neighbours, *out])
        inside += scores[:1 + len(neighbours)]
        outside += scores[1 + len(neighbours):]
    hit = sum(g > 0.5 for g in inside) / len(inside)
    rejected = sum(g < 0.5 for g in outside) / len(outside)
    assert hit >= 0.95 and rejected >= 0.95, (hit, rejected, len(inside), len(outside))


def test_out_of_scope_prompts_reach_the_base_model_unchanged(fresh, serac_backbone, vqa_source):
    """With 10 edits in the memory, a batch of the edits' own prompts and of locality prompts:
    every row routed to the backbone has the backbone's logits bit for bit (the same batch
    through the backbone alone), the in-scope rows do not; T-Loc of single edits is exactly 100."""
    records = vqa_source.records("eval", limit=10)
    templates = vqa_source.templates
    prompts = [p for r in records for p in edit_prompts(r, templates)]
    batch = serac_backbone.prepare(prompts)
    with torch.no_grad():
        reference = serac_backbone.forward(batch).logits
    for record in records:
        assert fresh.edit([record]).ok
    routed = fresh.in_scope(fresh.batch_scope_texts(batch))
    with torch.no_grad():
        logits = fresh.forward(batch).logits
    base_rows = [i for i, m in enumerate(routed) if m is None]
    cf_rows = [i for i, m in enumerate(routed) if m is not None]
    assert {p.kind for i, p in enumerate(prompts) if i in base_rows} >= {"t_loc"}
    assert all(prompts[i].kind in ("rel", "t_gen", "m_gen") or prompts[i].kind == "m_loc"
               for i in cf_rows)
    assert torch.equal(logits[base_rows], reference[base_rows])
    assert not torch.equal(logits[cf_rows], reference[cf_rows])
    fresh.restore()
    evaluator = Evaluator(MetricSpec(), templates)
    rows = SingleEdit().run(fresh, evaluator, records, sink=lambda row: None, progress=False)
    assert all(r["t_loc"] == 100.0 for r in rows)
    for record, row in zip(records, rows):
        m_loc = edit_prompts(record, templates)[4]
        fresh.edit([record])
        routed_away = fresh.in_scope([fresh.scope_text(m_loc)])[0] is None
        fresh.restore()
        if routed_away:
            assert row["m_loc"] == 100.0


def test_a_short_fit_beats_the_unedited_model_by_a_wide_margin(fresh, serac_backbone,
                                                               vqa_source):
    rel = single_edit_rel(fresh, vqa_source)
    unedited = NoEdit()
    unedited.attach(serac_backbone, vqa_source.templates)
    before = single_edit_rel(unedited, vqa_source)
    assert rel >= before + 40.0, (rel, before)


def test_restore_leaves_no_state(fresh, serac_backbone, vqa_source):
    records = vqa_source.records("eval", limit=5)
    model = serac_backbone.model
    before, fingerprint, hooks = state(model), model_fingerprint(model), hook_count(model)
    probe = serac_backbone.prepare([p for r in records for p in edit_prompts(r, vqa_source.templates)])
    with torch.no_grad():
        reference = serac_backbone.forward(probe).logits
    for record in records:
        fresh.edit([record])
    assert len(fresh.memory) == 5
    with torch.no_grad():
        assert not torch.equal(fresh.forward(probe).logits, reference)
    fresh.restore()
    assert len(fresh.memory) == 0 and not fresh.memory.keys and not fresh.memory.prompts
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])] == []
    assert model_fingerprint(model) == fingerprint and hook_count(model) == hooks
    with torch.no_grad():
        assert torch.equal(fresh.forward(probe).logits, reference)


def test_a_sequential_stream_of_20_edits(fresh, vqa_source):
    records = vqa_source.records("eval", limit=20)
    evaluator = Evaluator(MetricSpec(), vqa_source.templates)
    rows = Sequential(T=20).run(fresh, evaluator, records, sink=lambda row: None, progress=False)
    assert len(rows) == 20 and all(r["ok"] for r in rows)
    assert len(fresh.memory) == 0  # the protocol restored
    # most edits stay reachable after the 19 others; an edit whose question a later edit asks
    # again (about another picture) is overridden by it (ties in scope go to the latest edit)
    assert sum(r["rel"] for r in rows) / 20 >= 50.0
    assert all(r["t_loc"] == 100.0 for r in rows)


def test_greedy_answers_take_the_same_route(fresh, serac_backbone, vqa_source, monkeypatch):
    record = vqa_source.records("eval", limit=1)[0]
    rel, _, _, t_loc, _ = edit_prompts(record, vqa_source.templates)
    assert fresh.generate([rel, t_loc], 8) == serac_backbone.generate([rel, t_loc], 8)
    fresh.edit([record])
    asked = []
    real = CounterfactualModel.generate

    def spy(self, contexts, prompts, backbone, max_new_tokens):
        asked.extend(p.text for p in prompts)
        return real(self, contexts, prompts, backbone, max_new_tokens)

    monkeypatch.setattr(CounterfactualModel, "generate", spy)
    answers = fresh.generate([rel, t_loc], 8)
    assert asked == [rel.text]  # the edit prompt goes to the counterfactual model, T-Loc does not
    assert answers[1] == serac_backbone.generate([t_loc], 8)[0]


def test_the_scope_text_of_a_batch_row_is_the_prompts(fresh, serac_backbone, vqa_source):
    """What the classifier reads of a scored batch row is what it reads of the prompt itself."""
    prompts = [p for r in vqa_source.records("eval", limit=3)
               for p in edit_prompts(r, vqa_source.templates)]
    batch = serac_backbone.prepare(prompts)
    assert fresh.batch_scope_texts(batch) == [fresh.scope_text(p) for p in prompts]
    assert all("<" not in t and t for t in fresh.batch_scope_texts(batch))


def test_regularizers_are_refused_with_the_reason(random_tiny, vqa_source):
    editor = Serac(regularizer=ODEdit())
    with pytest.raises(ConfigError, match="reg=none"):
        editor.attach(random_tiny, vqa_source.templates, train_records=lambda: [])


def test_edit_before_fit_says_so(random_tiny, vqa_source):
    editor = Serac()
    editor.attach(random_tiny, vqa_source.templates)
    with pytest.raises(RuntimeError, match="fit"):
        editor.edit(vqa_source.records("eval", limit=1))


def test_balanced_bce_is_serac_s():
    log_g = torch.log(torch.tensor([0.9, 0.6, 0.2, 0.5]))
    labels = torch.tensor([1, 1, 0, 0])
    expected = (-(torch.log(torch.tensor(0.9)) + torch.log(torch.tensor(0.6))) / 2
                - (torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.5))) / 2)
    torch.testing.assert_close(balanced_bce(log_g, labels), expected)
    assert torch.isfinite(balanced_bce(torch.zeros(2), torch.tensor([0, 0])))  # g = 1 exactly


@pytest.mark.parametrize("family_name", ["blip2", "llava", "minigpt4", "qwen2vl"])
def test_the_language_model_copy_scores_text_as_the_backbone(family_name):
    """The counterfactual model's starting point on the embedded default: a standalone causal LM
    whose logits on a text-only batch are the backbone's."""
    backbone = build_random(family_name)
    lm = backbone.language_model_copy()
    batch = backbone.prepare([Prompt("Question: What colour is the square? Short answer:", "red"),
                              Prompt("nq question: a photo of", "green blue")])
    mask = batch.attention_mask
    with torch.no_grad():
        reference = backbone.forward(batch).logits
        copy = lm(input_ids=batch.input_ids, attention_mask=mask,
                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    attended = mask.bool()
    torch.testing.assert_close(copy[attended], reference[attended], atol=1e-5, rtol=1e-4)
    assert not any(p is q for p in lm.parameters() for q in backbone.model.parameters())


def _save_tiny_checkpoints(tmp_path, backbone):
    """A tiny DistilBERT (with a tokenizer) and a tiny OPT causal LM with a smaller vocabulary
    than the backbone's, saved the way Hugging Face checkpoints are."""
    classifier = tmp_path / "distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=len(backbone.tokenizer), dim=32, n_layers=1,
                                     n_heads=2, hidden_dim=64, max_position_embeddings=128,
                                     pad_token_id=backbone.pad_id)).save_pretrained(classifier)
    backbone.tokenizer.save_pretrained(classifier)
    counterfactual = tmp_path / "opt"
    vocab = backbone.decoder.get_output_embeddings().weight.shape[0]
    OPTForCausalLM(OPTConfig(vocab_size=vocab - 20, hidden_size=48, num_hidden_layers=1,
                             ffn_dim=96, num_attention_heads=2, word_embed_proj_dim=48,
                             max_position_embeddings=256, pad_token_id=backbone.pad_id)
                   ).save_pretrained(counterfactual)
    backbone.tokenizer.save_pretrained(counterfactual)
    return classifier, counterfactual


def test_the_real_checkpoint_path_loads_saved_models(random_tiny, vqa_source, tmp_path):
    """``classifier`` and ``counterfactual`` as folders: loaded with transformers' Auto classes,
    the classifier fine-tuned whole on its [CLS] embedding (EasyEdit's setting), the
    counterfactual model's vocabulary resized to the backbone's, the vision features through a
    Linear into its (narrower) embeddings; it fits, edits and routes."""
    classifier, counterfactual = _save_tiny_checkpoints(tmp_path, random_tiny)
    train = vqa_source.records("train", limit=16)
    editor = Serac(classifier=str(classifier), counterfactual=str(counterfactual),
                   training={"steps": 2, "batch_size": 2, "lr": 1e-3}, cache_dir=str(tmp_path),
                   progress=False)
    editor.attach(random_tiny, vqa_source.templates, train_records=lambda: train)
    report = editor.fit(train)
    assert report.trained_now and report.steps_run == 2
    nets = editor.networks
    assert type(nets.classifier.encoder.model).__name__ == "DistilBertModel"
    assert any(p.requires_grad for p in nets.classifier.encoder.parameters())
    lm = nets.counterfactual.lm
    vocab = random_tiny.decoder.get_output_embeddings().weight.shape[0]
    assert type(lm).__name__ == "OPTForCausalLM" and lm.get_output_embeddings().weight.shape[0] == vocab
    assert nets.counterfactual.vision.weight.shape == (48, random_tiny.decoder.config.hidden_size)
    record = vqa_source.records("eval", limit=1)[0]
    editor.edit([record])
    rel = edit_prompts(record, vqa_source.templates)[0]
    batch = random_tiny.prepare([rel])
    assert editor.in_scope([editor.scope_text(rel)]) == [0]  # its own prompt: g = 1
    with torch.no_grad():
        logits = editor.forward(batch).logits
    assert logits.shape == random_tiny.forward(batch).logits.shape
    assert len(editor.generate([rel], 3)) == 1
    # a second fit with the same settings loads the networks instead of training
    again = Serac(classifier=str(classifier), counterfactual=str(counterfactual),
                  training={"steps": 2, "batch_size": 2, "lr": 1e-3}, cache_dir=str(tmp_path),
                  progress=False)
    again.attach(random_tiny, vqa_source.templates, train_records=lambda: train)
    assert not again.fit(train).trained_now


def test_a_counterfactual_model_with_another_tokenizer_is_refused(random_tiny, vqa_source,
                                                                  tmp_path):
    _, counterfactual = _save_tiny_checkpoints(tmp_path, random_tiny)
    train_tokenizer(["a quite different corpus of words", "with other merges"], 200,
                    ).save_pretrained(counterfactual)
    editor = Serac(classifier="all-MiniLM-L6-v2", classifier_pooling="mean",
                   classifier_normalize=True, train_classifier_encoder=False,
                   classifier_head_dim=8, counterfactual=str(counterfactual),
                   cache_dir=str(cache_dir()), progress=False)
    editor.attach(random_tiny, vqa_source.templates)
    with pytest.raises(ConfigError, match="editor.counterfactual=.*tokenizer"):
        editor.fit(vqa_source.records("train", limit=4))


def test_a_missing_checkpoint_names_the_setting(random_tiny, vqa_source, tmp_path):
    editor = Serac(classifier=str(tmp_path / "nowhere"), cache_dir=str(tmp_path), progress=False)
    editor.attach(random_tiny, vqa_source.templates)
    with pytest.raises(Exception, match="editor.classifier"):
        editor.fit(vqa_source.records("train", limit=4))


@pytest.mark.parametrize("backbone_name", ["tiny_blip2", "tiny_llava", "tiny_minigpt4",
                                           "tiny_qwen2vl", "blip2", "llava", "minigpt4",
                                           "qwen2vl"])
def test_every_family_composes_its_settings(backbone_name):
    editor = composed("serac", backbone_name)
    assert isinstance(editor, Serac) and not editor.accepts_regularizer
    if backbone_name.startswith("tiny_"):
        assert editor.counterfactual == "backbone" and editor.counterfactual_init == "random"
        assert editor.classifier == "all-MiniLM-L6-v2" and not editor.train_classifier_encoder
    else:
        assert editor.classifier == "distilbert-base-cased" and editor.train_classifier_encoder
        assert editor.counterfactual_init == "pretrained"
    if backbone_name in ("llava", "minigpt4", "qwen2vl"):  # EasyEdit's MiniGPT-4 setting
        assert editor.counterfactual == "backbone" and editor.counterfactual_trainable_layers == 1
    else:
        assert editor.counterfactual_trainable_layers is None


@pytest.mark.parametrize("setting, value", [("threshold", 1.0), ("edit_weight", -1.0),
                                            ("classifier_lr", 0.0), ("classifier_head_dim", 0),
                                            ("counterfactual_trainable_layers", 0)])
def test_bad_settings_name_themselves(setting, value):
    with pytest.raises(ConfigError, match=f"editor.{setting}"):
        Serac(**{setting: value})


def _edits_routes_and_restores(editor: Serac, backbone, vqa_source) -> None:
    """One eval edit: its own prompt and image rephrase go to the counterfactual model, a
    text-locality prompt reaches the backbone bit for bit; greedy answers come from both routes;
    restore gives the backbone's logits back."""
    record = vqa_source.records("eval", limit=1)[0]
    rel, _, m_gen, t_loc, _ = edit_prompts(record, vqa_source.templates)
    batch = backbone.prepare([rel, m_gen, t_loc])
    with torch.no_grad():
        reference = backbone.forward(batch).logits
    editor.edit([record])
    assert editor.in_scope(editor.batch_scope_texts(batch)) == [0, 0, None]
    with torch.no_grad():
        logits = editor.forward(batch).logits
    assert torch.equal(logits[2], reference[2]) and not torch.equal(logits[:2], reference[:2])
    assert len(editor.generate([rel, t_loc], 3)) == 2
    editor.restore()
    with torch.no_grad():
        assert torch.equal(editor.forward(batch).logits, reference)


@pytest.mark.parametrize("family_name", ["blip2", "llava", "minigpt4", "qwen2vl"])
def test_every_family_fits_edits_and_routes(family_name, vqa_source, tmp_path):
    """On a random tiny model of each family, with the tiny settings' networks (the head starts at
    the identity, so the barely trained classifier scores with MiniLM's geometry): a 2-step
    fit, an edit, its own prompt routed to the counterfactual model and a text-locality prompt to
    the backbone bit for bit, greedy answers from both routes, and restore."""
    backbone = build_random(family_name)
    train = vqa_source.records("train", limit=8)
    editor = Serac(classifier="all-MiniLM-L6-v2", classifier_pooling="mean",
                   classifier_normalize=True, train_classifier_encoder=False,
                   classifier_head_dim=384, counterfactual="backbone", counterfactual_init="random",
                   training={"steps": 2, "batch_size": 2, "lr": 1e-3}, cache_dir=str(tmp_path),
                   progress=False)
    editor.attach(backbone, vqa_source.templates, train_records=lambda: train)
    editor.fit(train)
    _edits_routes_and_restores(editor, backbone, vqa_source)


def _top_layers_editor(tmp_path, layers: int = 1, steps: int = 2) -> Serac:
    """The real backbones' counterfactual setting (the backbone's own language model, its last
    ``layers`` decoder layers trained) with the tiny settings' frozen MiniLM and its head."""
    return Serac(classifier="all-MiniLM-L6-v2", classifier_pooling="mean",
                 classifier_normalize=True, train_classifier_encoder=False,
                 classifier_head_dim=384, counterfactual="backbone",
                 counterfactual_trainable_layers=layers,
                 training={"steps": steps, "batch_size": 2, "lr": 1e-3},
                 cache_dir=str(tmp_path), progress=False)


@pytest.mark.parametrize("family_name", ["llava", "qwen2vl"])
def test_a_top_layers_counterfactual_trains_its_copies_only(family_name, vqa_source, tmp_path):
    """``counterfactual_trainable_layers=1`` on a Llama-style family and on Qwen2-VL: the
    counterfactual model is the backbone's own language model around a copy of its last layer;
    the copy (and the classifier) is all that is saved; a fit changes the copy and leaves the
    backbone, which holds every frozen part, bit for bit as it was, hooks included; edit, route,
    generate and restore work, and the backbone answers as before."""
    backbone = build_random(family_name)
    model = backbone.model
    before, fingerprint, hooks = state(model), model_fingerprint(model), hook_count(model)
    last = backbone.modules.language_layer(-1)
    train = vqa_source.records("train", limit=8)
    editor = _top_layers_editor(tmp_path)
    editor.attach(backbone, vqa_source.templates, train_records=lambda: train)
    assert editor.fit(train).trained_now
    cf = editor.networks.counterfactual
    lm = cf.language_model()
    own = {id(p) for p in cf.layers.parameters()}
    shared = {id(p) for p in model.parameters()}
    assert own and not own & shared and {id(p) for p in lm.parameters()} - shared == own
    assert all(k.startswith("layers.0.") for k in cf.state_dict())
    changed = [k for k, v in cf.layers[0].state_dict().items()
               if not torch.equal(v, last.state_dict()[k])]
    assert changed  # the copy trained
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])] == []
    _edits_routes_and_restores(editor, backbone, vqa_source)
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])] == []
    assert model_fingerprint(model) == fingerprint and hook_count(model) == hooks


def test_a_top_layers_counterfactual_starts_as_the_backbone_and_trains_in_float32():
    """Untrained, with no edit in context, the counterfactual model scores text as the backbone
    does. On a bfloat16 backbone its copied layer holds float32 weights, the rest stays
    bfloat16, and a backward reaches the copy alone."""
    backbone = build_random("minigpt4")
    lm, top = backbone.language_model_top_copy(2)
    for copied, i in zip(top, (-2, -1)):  # copies of the last two layers, in order
        original = backbone.modules.language_layer(i)
        assert copied is not original and all(
            torch.equal(v, original.state_dict()[k]) for k, v in copied.state_dict().items())
    dim = backbone.decoder.get_input_embeddings().embedding_dim
    cf = CounterfactualModel(lm, dim, top_layers=top)
    batch = backbone.prepare([Prompt("Question: What colour is the square? Short answer:", "red")])
    with torch.no_grad():
        torch.testing.assert_close(cf([[]], batch, None), backbone.forward(batch).logits,
                                   atol=1e-5, rtol=1e-4)
    backbone.model.to(torch.bfloat16).requires_grad_(False)
    lm, top = backbone.language_model_top_copy(1)
    cf = CounterfactualModel(lm, dim, top_layers=top)
    assert all(p.dtype == torch.float32 for p in cf.parameters())
    assert backbone.modules.language_layer(-1).mlp.down_proj.weight.dtype == torch.bfloat16
    logits = cf([[3, 4]], backbone.prepare([Prompt("nq question: a photo of", "green")]), None)
    logits.logsumexp(-1).sum().backward()
    assert torch.isfinite(logits).all() and logits.dtype == torch.float32
    assert all(p.grad is not None for p in cf.parameters())
    assert all(p.grad is None for p in backbone.model.parameters())


def test_the_trainable_layers_are_part_of_the_cache_key(vqa_source):
    backbone = build_random("llava")
    train = vqa_source.records("train", limit=4)
    keys = []
    for layers in (None, 1, 2):
        editor = Serac(counterfactual="backbone", counterfactual_trainable_layers=layers,
                       cache_dir="unused")
        editor.attach(backbone, vqa_source.templates)
        keys.append(editor.training_key(train))
    assert len(set(keys)) == 3


def test_more_trainable_layers_than_the_backbone_has_is_refused(vqa_source):
    backbone = build_random("llava")
    total = backbone.modules.num_language_layers
    editor = Serac(counterfactual="backbone", counterfactual_trainable_layers=total + 1)
    with pytest.raises(ConfigError, match=f"editor.counterfactual_trainable_layers={total + 1}: "
                                          f".*{total} decoder layers"):
        editor.attach(backbone, vqa_source.templates)
    with pytest.raises(ConfigError, match="counterfactual_trainable_layers=1 .*"
                                          "editor.counterfactual=backbone"):
        Serac(counterfactual="facebook/opt-125m", counterfactual_trainable_layers=1)
