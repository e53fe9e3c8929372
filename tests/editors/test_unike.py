"""UniKE: edits flip the target; restore is bit-identical after a stream; the neurons stay silent
on unrelated inputs; the latent memory, α blend, retrieval attention and the contrastive losses
compute what their equations say; the encoders' fit is cached; no scored prompt reaches an edit;
ODEdit and ASAM terms change the update.

The model tests run on the tiny BLIP-2 with the settings ``editor=unike backbone=tiny_blip2``
composes and a shorter encoder fit (into a temporary cache); the contract tests use the random
tiny BLIP-2."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmke.data.prompts import edit_prompts
from mmke.editors.unike import UniKE
from mmke.editors.unike_nets import (UniKENetworks, alpha, blend, info_nce, latent_knowledge,
                                     semantic_loss, steering, truthfulness_loss)
from mmke.errors import ConfigError
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.sequential import Sequential
from mmke.regularizers.asam import ASAM
from mmke.regularizers.base import NoRegularizer
from mmke.regularizers.hidden import last_prompt_positions
from mmke.regularizers.odedit import ODEdit
from mmke.sweep.fingerprint import hook_count, model_fingerprint
from tests.editors.answered import answered_record
from tests.editors.conftest import composed, single_edit_rel, state
from tests.regularizers import seam_helpers as seam

pytestmark = pytest.mark.usefixtures("one_thread")

#: a short encoder fit (seconds): the neurons carry Rel; the encoders need only be trained
SHORT = {"steps": 150, "batch_size": 16, "lr": 1e-4, "checkpoint_every": 1000}


@pytest.fixture(scope="module")
def fitted(pretrained, vqa_source, tmp_path_factory) -> UniKE:
    train = vqa_source.records("train")
    editor = composed("unike", "tiny_blip2", training=SHORT, progress=False,
                      cache_dir=str(tmp_path_factory.mktemp("unike")))
    editor.attach(pretrained, vqa_source.templates, train_records=lambda: train)
    pretrained.model.zero_grad(set_to_none=True)  # earlier tests of the session may leave some
    editor.fit(train)
    return editor


@pytest.fixture
def unike(fitted):
    fitted.restore()
    yield fitted
    fitted.restore()


# --- on the pretrained tiny BLIP-2 ------------------------------------------------------------

def test_single_edits_flip_the_target(unike, vqa_source):
    """Rel >= 90% over 20 single edits, scored by the real evaluator."""
    rel = single_edit_rel(unike, vqa_source)
    assert rel >= 90.0, rel


def test_restore_is_bit_identical_after_a_20_edit_stream(unike, pretrained, vqa_source):
    records = vqa_source.records("eval", limit=20)
    model = pretrained.model
    probe = pretrained.prepare([p for r in records[:4]
                                for p in edit_prompts(r, vqa_source.templates)])
    with torch.no_grad():
        reference = pretrained.forward(probe).logits
    before, fingerprint, n_hooks = state(model), model_fingerprint(model), hook_count(model)
    for record in records:
        assert unike.edit([record]).ok
    # the stream accumulated: one memory entry per edit, one frozen block per layer and edit,
    # neuron hooks on every knowledge layer and a blend hook on its attention
    assert unike.memory_size == 20
    assert all(len(patch) == 20 for patch in unike.patches)
    assert not any(p.requires_grad for patch in unike.patches for p in patch.parameters())
    assert hook_count(model) == n_hooks + 3 * len(unike.layers)
    with torch.no_grad():
        assert not torch.equal(pretrained.forward(probe).logits, reference)
    unike.restore()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []
    assert model_fingerprint(model) == fingerprint and hook_count(model) == n_hooks
    assert unike.memory_size == 0 and unike.remembered == []
    with torch.no_grad():
        assert torch.equal(pretrained.forward(probe).logits, reference)


def test_the_sequential_protocol_restores(unike, pretrained, vqa_source):
    records = vqa_source.records("eval", limit=5)
    before = state(pretrained.model)
    rows = Sequential(T=5).run(unike, Evaluator(MetricSpec(), vqa_source.templates), records,
                               sink=lambda row: None, progress=False)
    assert len(rows) == 5 and sum(r["rel"] for r in rows) / 5 >= 80
    assert seam.changed(pretrained.model, before) == [] and unike.memory_size == 0


def test_the_neurons_stay_silent_on_unrelated_inputs(unike, pretrained, vqa_source):
    """After a 20-edit stream, the neurons' pre-activations h·k + b at every position of prompts
    no edit saw (the edited records' own T-Loc/M-Loc prompts, and train-split locality prompts):
    some neuron fires at most at 15% of those positions (T-Patcher's bound). Each edit's first
    neuron of the last layer fires on its own last prompt token."""
    records = vqa_source.records("eval", limit=20)
    train = vqa_source.records("train")
    for record in records:
        assert unike.edit([record]).ok
    templates = vqa_source.templates
    scored_loc = [p for r in records for p in edit_prompts(r, templates)[3:]]
    train_loc = [p for r in train[-20:] for p in edit_prompts(r, templates)[3:]]
    for prompts in (scored_loc, train_loc):
        batch = pretrained.prepare(prompts)
        fires = (unike.batch_activations(batch) > 0).any(dim=-1)
        rate = fires[batch.attention_mask.bool()].float().mean().item()
        assert rate <= 0.15, rate
    own = pretrained.prepare([edit_prompts(r, templates)[0] for r in records])
    last = unike.patches[-1]
    queries = unike.batch_activations(own)[..., -last.n_neurons:]     # the last layer's neurons
    at_last = queries[torch.arange(20), last_prompt_positions(own)]
    first = torch.tensor([0] + [len(b) for b in last.blocks[:-1]]).cumsum(0)
    assert (at_last[torch.arange(20), first] > 0).all()


def test_greedy_answers_go_through_the_edit(unike, pretrained, vqa_source):
    record, rel = answered_record(pretrained, vqa_source)
    assert unike.edit([record]).ok
    assert unike.generate([rel], max_new_tokens=8)[0].startswith(record.alt)
    unike.restore()
    assert unike.generate([rel], max_new_tokens=8)[0] == record.pred


def test_the_blend_hook_computes_alpha_h_plus_one_minus_alpha_h_know(unike, pretrained,
                                                                      vqa_source):
    """At a knowledge layer, the self-attention output with the memory equals α·h + (1 − α)·h_know
    computed by hand from the output without it, at every position."""
    records = vqa_source.records("eval", limit=3)
    for record in records:
        assert unike.edit([record]).ok
    layer, j = unike._layers[0], 0
    batch = pretrained.prepare([edit_prompts(r, vqa_source.templates)[1] for r in records])
    seen: list[torch.Tensor] = []
    attention = pretrained.modules.attention(layer)
    handle = attention.register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
    try:
        with torch.no_grad():
            pretrained.forward(batch)     # hooks run in order: the blend first, then the spy
            with unike._blend_off():
                pretrained.forward(batch)
    finally:
        handle.remove()
    blended, plain = seen[0], seen[-1]
    # the earlier knowledge layers (none here: this is the first) leave the input alone
    h = plain.reshape(-1, plain.shape[-1]).float()
    sem, pos = unike.sem[j], unike.pos[j]
    cos = F.normalize(h, dim=-1) @ F.normalize(sem, dim=-1).T
    top = cos.topk(min(unike.top_k, len(sem)), dim=1).indices
    weights = ((sem[top] @ h.unsqueeze(-1)).squeeze(-1) / math.sqrt(h.shape[-1])).softmax(-1)
    h_know = (weights.unsqueeze(-1) * pos[top]).sum(1)
    enc = unike.nets.enc_sem[j]
    r = F.cosine_similarity(enc(h_know), enc(h), dim=-1)
    tau = unike.relevance_threshold
    a = 1 - torch.relu(r - tau) / (1 - tau)
    want = a[:, None] * h + (1 - a[:, None]) * h_know
    torch.testing.assert_close(blended.reshape(-1, h.shape[-1]).float(), want, atol=1e-5,
                               rtol=1e-4)
    assert (a < 1).any()   # the memory does act somewhere (the edits' own prompts)


def test_the_fit_trains_the_encoders_once_and_a_second_fit_loads_them(fitted, pretrained,
                                                                       vqa_source):
    report = fitted.fit_report
    assert report is not None and report.trained_now and report.steps_run == SHORT["steps"]
    assert set(report.last_losses) == {"loss", "sem", "tru", "dir"}
    assert all(p.grad is None for p in pretrained.model.parameters())
    assert fitted.nets.tru_neg_count.min() > 0
    again = composed("unike", "tiny_blip2", training=SHORT, progress=False,
                     cache_dir=fitted.cache_dir, regularizer=ODEdit())
    train = vqa_source.records("train")
    again.attach(pretrained, vqa_source.templates, train_records=lambda: train)
    loaded = again.fit(train)
    # UniKE+ODEdit reads UniKE's fit: the regularizer does not enter the encoders' objective
    assert not loaded.trained_now and loaded.key == report.key
    mine, theirs = fitted.nets.state_dict(), again.nets.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("backbone_name", ["tiny_blip2", "tiny_llava", "tiny_minigpt4",
                                           "tiny_qwen2vl", "blip2", "llava", "minigpt4",
                                           "qwen2vl"])
def test_every_family_composes_its_settings(backbone_name):
    editor = composed("unike", backbone_name)
    assert isinstance(editor, UniKE) and editor.accepts_regularizer and editor.needs_training


# --- the equations on hand-built tensors -------------------------------------------------------

def test_latent_knowledge_retrieves_top_k_by_cosine_and_attends_over_h_pos():
    sem = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    pos = torch.tensor([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0], [-7.0, 0.0]])
    h = torch.tensor([[2.0, 0.5]])
    h_know, found = latent_knowledge(h, sem, pos, k=2)
    # cosines: 0.970, 0.243, 0.857, -0.970 → rows 0 and 2
    assert found.tolist() == [[0, 2]]
    scores = torch.tensor([2.0, 2.5]) / math.sqrt(2)
    w = scores.softmax(0)
    torch.testing.assert_close(h_know, (w[0] * pos[0] + w[1] * pos[2])[None])
    # K larger than the memory takes all of it
    _, found = latent_knowledge(h, sem, pos, k=40)
    assert found.shape == (1, 4)


def test_alpha_and_the_blend():
    sem_h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    sem_know = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])   # cos 1, 0, 0.707
    torch.testing.assert_close(alpha(sem_know, sem_h), torch.tensor([0.0, 1.0, 1 - 0.5 ** 0.5]))
    # τ = 0.8: below it nothing blends; above it the share rises linearly to 1
    torch.testing.assert_close(alpha(sem_know, sem_h, 0.8), torch.tensor([0.0, 1.0, 1.0]))
    h, h_know = torch.tensor([[2.0, 4.0]]), torch.tensor([[10.0, 0.0]])
    torch.testing.assert_close(blend(h, h_know, torch.tensor([0.25])),
                               torch.tensor([[0.25 * 2 + 0.75 * 10, 0.25 * 4]]))


def test_the_contrastive_losses_on_hand_built_codes():
    # InfoNCE: two anchors, each aligned with its own positive
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    t = 0.5
    want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0)))
    assert info_nce(a, p, t).item() == pytest.approx(want, rel=1e-5)
    # the semantic loss is the mean of the three InfoNCE terms
    n = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    assert semantic_loss(a, p, n, t).item() == pytest.approx(
        (info_nce(a, p, t) + info_nce(a, n, t) + info_nce(p, n, t)).item() / 3, rel=1e-6)
    # truthfulness: true codes along x, wrong ones along y; each code's one same-kind partner
    tp, tn = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # per code: partner at cos 1, two of the other kind at cos 0
    want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0)))
    assert truthfulness_loss(tp, tn, t).item() == pytest.approx(want, rel=1e-5)
    # separated codes give a lower loss than mixed ones
    mixed = truthfulness_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                              torch.tensor([[1.0, 0.0], [0.0, 1.0]]), t)
    assert truthfulness_loss(tp, tn, t) < mixed


def test_steering_is_beta_w_zeta_of_the_mean_truthfulness_difference():
    nets = UniKENetworks(n_layers=1, hidden=3, width=4, out_dim=2)
    with torch.no_grad():
        nets.w_zeta[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    tru_pos = torch.tensor([[1.0, 3.0], [3.0, 1.0]])                # mean (2, 2)
    got = steering(nets.w_zeta[0], tru_pos, torch.tensor([1.0, 0.0]), beta=0.5)
    torch.testing.assert_close(got, 0.5 * torch.tensor([1.0, 4.0, 3.0]))
    nets.track_negatives(0, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(nets.tru_neg[0], torch.tensor([1.0, 1.0]))  # the first sets it
    nets.track_negatives(0, torch.tensor([[11.0, 1.0]]))
    torch.testing.assert_close(nets.tru_neg[0], torch.tensor([0.9 + 1.1, 0.9 + 0.1]))


# --- contract on the random tiny BLIP-2 ----------------------------------------------------------

def make_random_unike(backbone, source, regularizer=None, steps: int = 4, cache=None, **settings):
    train = source.records("train")
    editor = UniKE(layers=[-2, -1], n_neurons=2, steps=steps, memory_prompts=4,
                   encoder_width=16, encoder_dim=8, top_k=4, regularizer=regularizer,
                   training={"steps": 2, "batch_size": 4}, progress=False,
                   cache_dir=str(cache), **settings)
    editor.attach(backbone, source.templates, train_records=lambda: train)
    editor.fit(train)
    return editor


@pytest.fixture
def random_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("unike_random")


@pytest.mark.parametrize("make_reg", [ODEdit, ASAM], ids=["odedit", "asam"])
def test_regularizers_run_and_change_the_update(random_tiny, vqa_source, make_reg, random_cache):
    """Same seed, same edit: UniKE alone twice gives the same neurons; with the regularizer's
    terms in the loss the trained neurons differ; restore is still exact."""
    record = vqa_source.records("eval", limit=1)
    before = state(random_tiny.model)

    def trained(regularizer) -> list[torch.Tensor]:
        editor = make_random_unike(random_tiny, vqa_source, regularizer, cache=random_cache)
        assert editor.edit(record).ok
        params = [p.detach().clone() for patch in editor.patches for p in patch.parameters()]
        if regularizer is not None:
            assert regularizer.last_terms  # its loss ran at the steps
        editor.restore()
        return params

    alone, again, regularized = trained(None), trained(None), trained(make_reg())
    assert all(torch.equal(a, b) for a, b in zip(alone, again))
    assert any(not torch.equal(a, b) for a, b in zip(alone, regularized))
    assert seam.changed(random_tiny.model, before) == []


@pytest.mark.parametrize("make_reg", [NoRegularizer, ODEdit], ids=["none", "odedit"])
def test_no_scored_prompt_reaches_an_edit(random_tiny, vqa_source, monkeypatch, make_reg,
                                          random_cache):
    def make_editor(backbone, source, regularizer, steps):
        return make_random_unike(backbone, source, regularizer, steps, cache=random_cache)

    extra = seam.no_scored_prompt_reaches_the_edit(random_tiny, vqa_source, make_reg,
                                                   monkeypatch, make_editor=make_editor)
    assert extra > 0, "the memory set drew no train-split prompt"


def test_a_non_finite_loss_undoes_the_call(random_tiny, vqa_source, random_cache):
    n_hooks = hook_count(random_tiny.model)
    editor = make_random_unike(random_tiny, vqa_source, cache=random_cache)
    records = vqa_source.records("eval", limit=3)
    assert editor.edit(records[:1]).ok
    kept = [p.detach().clone() for patch in editor.patches for p in patch.parameters()]
    editor.lr = float("inf")
    outcome = editor.edit(records[1:])
    assert not outcome.ok and "non-finite" in outcome.message
    assert editor.memory_size == 1 and len(editor.remembered) == 1
    assert all(len(patch) == 1 for patch in editor.patches)
    now = [p for patch in editor.patches for p in patch.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(kept, now))
    editor.restore()
    assert hook_count(random_tiny.model) == n_hooks


def test_editing_before_the_fit_is_an_error(random_tiny, vqa_source):
    editor = UniKE(memory_prompts=0, layers=[-1])
    editor.attach(random_tiny, vqa_source.templates)
    with pytest.raises(RuntimeError, match="fit"):
        editor.edit(vqa_source.records("eval", limit=1))


@pytest.mark.parametrize("setting, value", [("activation", "tanh"), ("n_neurons", 0),
                                            ("steps", 0), ("lr", 0.0), ("top_k", 0),
                                            ("layers", []), ("relevance_threshold", 1.0),
                                            ("truth_beta", -1.0), ("temperature", 0.0)])
def test_bad_settings_name_themselves(setting, value):
    with pytest.raises(ConfigError, match=f"editor.{setting}"):
        UniKE(**{setting: value})


def test_a_layer_the_backbone_lacks_is_a_config_error(random_tiny, vqa_source):
    with pytest.raises(ConfigError, match="editor.layers"):
        UniKE(layers=[27]).attach(random_tiny, vqa_source.templates, train_records=lambda: [])
    with pytest.raises(ConfigError, match="twice"):
        UniKE(layers=[-1, 2]).attach(random_tiny, vqa_source.templates,
                                     train_records=lambda: [])
