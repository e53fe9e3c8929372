"""T-Patcher: edits flip the target; restore is bit-identical after a stream; the neurons stay
silent on unrelated inputs; the patch adds exactly act(h·k + b)·v (appended neurons); no scored
prompt reaches an edit; ODEdit and ASAM terms change the update.

The model tests run on the tiny BLIP-2 and on the Llama-style tiny LLaVA with the per-family
settings Hydra composes (``editor=tpatcher backbone=<family>``). The tiny LLaVA cases are marked
slow, as in test_grace.py. The contract tests build random tiny models in-process."""

import pytest
import torch
from PIL import Image
from torch import nn

from mmke.config import build
from mmke.data.prompts import edit_prompts
from mmke.data.record import LazyImage, Prompt
from mmke.editors.neurons import NeuronPatch, ffn_inputs
from mmke.editors.tpatcher import TPatcher, top_k_exp_mean
from mmke.errors import ConfigError
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.sequential import Sequential
from mmke.regularizers.asam import ASAM
from mmke.regularizers.base import NoRegularizer
from mmke.regularizers.hidden import last_prompt_positions
from mmke.regularizers.odedit import ODEdit
from mmke.sweep.fingerprint import hook_count, model_fingerprint
from tests.backbones.families import build as build_random
from tests.editors.answered import answered_record
from tests.regularizers import seam_helpers as seam
from tests.editors.conftest import composed, single_edit_rel, state

pytestmark = pytest.mark.usefixtures("one_thread")


def make_tpatcher(family: str, **overrides):
    """The editor as ``python run.py editor=tpatcher backbone=<family>`` builds it."""
    return composed("tpatcher", family, **overrides)


@pytest.fixture
def tpatcher(family, backbone, vqa_source, train):
    editor = make_tpatcher(family)
    editor.attach(backbone, vqa_source.templates, train_records=lambda: train)
    yield editor
    editor.restore()


# --- on the pretrained tiny models ------------------------------------------------------------

def test_single_edits_flip_the_target(tpatcher, vqa_source):
    """Rel >= 90% over 20 single edits, scored by the real evaluator."""
    rel = single_edit_rel(tpatcher, vqa_source)
    assert rel >= 90.0, rel


def test_restore_is_bit_identical_after_a_20_edit_stream(tpatcher, backbone, vqa_source):
    records = vqa_source.records("eval", limit=20)
    model = backbone.model
    before, fingerprint = state(model), model_fingerprint(model)
    n_hooks = hook_count(model)
    evaluator = Evaluator(MetricSpec(), vqa_source.templates)
    rows = Sequential(T=20).run(tpatcher, evaluator, records, sink=lambda row: None,
                                progress=False)
    assert len(rows) == 20
    # the protocol restored: every weight bit for bit; flags, modes and hooks as before
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []
    assert model_fingerprint(model) == fingerprint and hook_count(model) == n_hooks
    assert len(tpatcher.patch) == 0 and tpatcher.remembered == []


def test_a_stream_accumulates_frozen_neurons_and_restore_removes_them(tpatcher, backbone,
                                                                      vqa_source):
    records = vqa_source.records("eval", limit=5)
    probe = backbone.prepare([edit_prompts(r, vqa_source.templates)[0] for r in records])
    with torch.no_grad():
        unedited = backbone.forward(probe).logits
    n_hooks = hook_count(backbone.model)
    assert tpatcher.edit(records[:1]).ok
    first = {n: p.detach().clone() for n, p in tpatcher.patch.blocks[0].named_parameters().items()}
    for record in records[1:]:
        assert tpatcher.edit([record]).ok
    assert len(tpatcher.patch) == 5
    assert all(1 <= len(block) <= tpatcher.n_neurons for block in tpatcher.patch.blocks)
    assert hook_count(backbone.model) == n_hooks + 2
    # the first edit's neurons did not train while the later ones did
    assert all(torch.equal(p, first[n])
               for n, p in tpatcher.patch.blocks[0].named_parameters().items())
    assert not any(p.requires_grad for p in tpatcher.patch.parameters())
    with torch.no_grad():
        assert not torch.equal(backbone.forward(probe).logits, unedited)
    tpatcher.restore()
    assert hook_count(backbone.model) == n_hooks
    with torch.no_grad():
        assert torch.equal(backbone.forward(probe).logits, unedited)


def test_the_neurons_stay_silent_on_unrelated_inputs(tpatcher, backbone, vqa_source, train):
    """After a 20-edit stream (60 neurons at most), the neurons' pre-activations h·k + b at every
    position of prompts no edit saw: the edited records' own T-Loc/M-Loc prompts (scored, never
    trained on) and train-split locality prompts. Measured: some neuron fires at 6.1% / 9.4% of
    those positions on the tiny BLIP-2 (none on its text-only T-Loc prompts), 5.9% / 7.3% on the
    tiny LLaVA; it fires somewhere in 38-80% of the prompts, mostly multimodal ones. Bound: at
    most 15% of positions. The edit prompts themselves fire at their last prompt token."""
    records = vqa_source.records("eval", limit=20)
    for record in records:
        assert tpatcher.edit([record]).ok
    templates = vqa_source.templates
    scored_loc = [p for r in records for p in edit_prompts(r, templates)[3:]]
    train_loc = [p for r in train[-20:] for p in edit_prompts(r, templates)[3:]]
    for prompts in (scored_loc, train_loc):
        batch = backbone.prepare(prompts)
        pre = tpatcher.batch_activations(batch)                        # [rows, seq, neurons]
        attended = batch.attention_mask.bool()
        fires = (pre > 0).any(dim=-1)
        position_rate = fires[attended].float().mean().item()
        assert position_rate <= 0.15, position_rate
    own = backbone.prepare([edit_prompts(r, templates)[0] for r in records])
    at_last = tpatcher.batch_activations(own)[torch.arange(20), last_prompt_positions(own)]
    # edit i's first neuron fires on its own last prompt token
    first = torch.tensor([0] + [len(b) for b in tpatcher.patch.blocks[:-1]]).cumsum(0)
    assert (at_last[torch.arange(20), first] > 0).all()


def test_greedy_answers_go_through_the_patch(tpatcher, backbone, vqa_source):
    record, rel = answered_record(backbone, vqa_source)
    assert tpatcher.edit([record]).ok
    assert tpatcher.generate([rel], max_new_tokens=8)[0].startswith(record.alt)
    tpatcher.restore()
    assert tpatcher.generate([rel], max_new_tokens=8)[0] == record.pred


@pytest.mark.parametrize("backbone_name", ["tiny_blip2", "tiny_llava", "tiny_minigpt4",
                                           "tiny_qwen2vl", "blip2", "llava", "minigpt4",
                                           "qwen2vl"])
def test_every_family_composes_its_settings(backbone_name):
    editor = make_tpatcher(backbone_name)
    assert isinstance(editor, TPatcher) and editor.layer == -1


# --- contract on random tiny models (no knowledge needed) ------------------------------------

def test_the_patch_equals_neurons_appended_to_opt_fc1_and_fc2(tmp_path):
    """On OPT (ReLU FFN) the hook patch gives the same logits as resizing fc1 and fc2 with the
    extra neurons' rows and columns (Eq. 2)."""
    backbone = build_random("blip2")
    mods = backbone.modules
    last = mods.num_language_layers - 1
    fc1, fc2 = mods.ffn_in(last), mods.ffn_out(last)
    gen = torch.Generator().manual_seed(0)
    n, d, d_out = 3, fc1.in_features, fc2.out_features
    keys, biases = torch.randn(n, d, generator=gen), torch.randn(n, generator=gen)
    values = torch.randn(n, d_out, generator=gen)
    # a picture makes the image tokens part of the checked positions
    Image.new("RGB", (48, 48), (200, 20, 20)).save(tmp_path / "im.png")
    batch = backbone.prepare([Prompt("Question: What colour is the square? Short answer:",
                                     "red", LazyImage(tmp_path / "im.png")),
                              Prompt("nq question: a photo of", "green blue")])
    patch = NeuronPatch(fc1, fc2, "relu")
    patch.add(keys, biases, values)
    with torch.no_grad():
        patched = backbone.forward(batch).logits
    patch.remove()
    saved = (fc1.weight, fc1.bias, fc2.weight)
    try:
        fc1.weight = nn.Parameter(torch.cat([fc1.weight.detach(), keys]))
        fc1.bias = nn.Parameter(torch.cat([fc1.bias.detach(), biases]))
        fc2.weight = nn.Parameter(torch.cat([fc2.weight.detach(), values.T], dim=1))
        with torch.no_grad():
            appended = backbone.forward(batch).logits
    finally:
        fc1.weight, fc1.bias, fc2.weight = saved
    with torch.no_grad():
        unpatched = backbone.forward(batch).logits
    assert not torch.allclose(patched, unpatched, atol=1e-3)  # the neurons do fire somewhere
    torch.testing.assert_close(patched, appended, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family_name", ["blip2", "llava", "minigpt4", "qwen2vl"])
def test_the_patch_adds_exactly_act_hk_plus_b_times_v(family_name):
    """At the patched layer, FFN output with the patch minus without = relu(h·k + b)·v with h the
    FFN input, computed here by hand, at every position."""
    backbone = build_random(family_name)
    mods = backbone.modules
    layer = mods.num_language_layers - 1
    ffn_in, ffn_out = mods.ffn_in(layer), mods.ffn_out(layer)
    batch = backbone.prepare([Prompt("Question: What colour is the square? Short answer:", "red"),
                              Prompt("nq question: a photo of", "green blue")])
    seen: dict[str, torch.Tensor] = {}

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        handles = [ffn_in.register_forward_pre_hook(lambda m, a: seen.update(h=a[0])),
                   ffn_out.register_forward_hook(lambda m, a, out: seen.update(y=out))]
        try:
            with torch.no_grad():
                backbone.forward(batch)
        finally:
            for handle in handles:
                handle.remove()
        return seen["h"], seen["y"]

    h, y = run()
    gen = torch.Generator().manual_seed(1)
    # random keys, biases at minus the median pre-activation: about half the positions fire
    keys = torch.randn(2, h.shape[-1], generator=gen) / h.shape[-1] ** 0.5
    biases = -(h.reshape(-1, h.shape[-1]) @ keys.T).median(dim=0).values
    values = torch.randn(2, y.shape[-1], generator=gen)
    patch = NeuronPatch(ffn_in, ffn_out, "relu")
    patch.add(keys, biases, values)
    try:
        h_patched, y_patched = run()
    finally:
        patch.remove()
    torch.testing.assert_close(h_patched, h)  # the FFN input is not the patch's business
    by_hand = torch.relu(h @ keys.T + biases) @ values
    fired = (h @ keys.T + biases > 0)
    assert fired.any() and not fired.all()
    torch.testing.assert_close(y_patched - y, by_hand, atol=1e-5, rtol=1e-4)
    assert hook_count(backbone.model) == 0


def test_ffn_inputs_are_the_queries_at_every_position(random_tiny, vqa_source):
    record = vqa_source.records("eval", limit=1)[0]
    batch = random_tiny.prepare(edit_prompts(record, vqa_source.templates)[:2])
    queries = ffn_inputs(random_tiny, batch, -1)
    assert queries.shape[:2] == batch.input_ids.shape
    assert queries.shape[-1] == random_tiny.modules.ffn_in(2).in_features


def make_random_tpatcher(backbone, source, regularizer=None, steps: int = 4, **settings):
    train = source.records("train")
    editor = TPatcher(steps=steps, memory_prompts=4, regularizer=regularizer, **settings)
    editor.attach(backbone, source.templates, train_records=lambda: train)
    return editor


def test_the_key_starts_at_the_normalised_edit_query(random_tiny, vqa_source):
    """Before any step (steps=1 with an immediate early stop): one neuron per target position,
    k = q_e/|q_e|^2 so h·k = 1, b = 0, v = 0 (the model is unchanged)."""
    editor = make_random_tpatcher(random_tiny, vqa_source, steps=1, early_stop_loss=1e9,
                                  n_neurons=2)
    tokens = random_tiny.tokenizer
    record = next(r for r in vqa_source.records("eval", limit=50)
                  if len(tokens(" " + r.alt, add_special_tokens=False).input_ids) >= 3)
    rel = edit_prompts(record, vqa_source.templates)[0]
    batch = random_tiny.prepare([rel])
    with torch.no_grad():
        before = random_tiny.forward(batch).logits
    outcome = editor.edit([record])
    assert outcome.ok and outcome.steps == 0
    block = editor.patch.blocks[0]
    assert len(block) == 2  # capped by n_neurons, though the answer has more tokens
    rows, cols = batch.target_positions()
    q = ffn_inputs(random_tiny, batch, -1)[rows[:2], cols[:2]]  # neuron i: target position i
    torch.testing.assert_close((q * block.keys).sum(dim=1), torch.ones(2))
    assert torch.equal(block.biases, torch.zeros(2)) and torch.equal(block.values,
                                                                     torch.zeros_like(block.values))
    with torch.no_grad():
        assert torch.equal(random_tiny.forward(batch).logits, before)
    editor.restore()


def test_the_default_never_passes_a_scored_prompt_to_the_edit(random_tiny, vqa_source,
                                                              monkeypatch):
    """With reg=none the editor still draws memory prompts from the train split: none is a
    prompt or a picture scored for the record, and the request carries the edit prompt alone."""
    extra = seam.no_scored_prompt_reaches_the_edit(random_tiny, vqa_source, NoRegularizer,
                                                   monkeypatch, make_editor=make_random_tpatcher)
    assert extra > 0, "the memory set drew no train-split prompt"


@pytest.mark.parametrize("make_reg", [ODEdit, ASAM], ids=["odedit", "asam"])
def test_regularizers_run_and_change_the_update(random_tiny, vqa_source, make_reg):
    """Same seed, same edit: T-Patcher alone twice gives the same neurons; with the
    regularizer's terms in the loss the trained neurons differ; restore is still exact."""
    record = vqa_source.records("eval", limit=1)
    before = state(random_tiny.model)

    def trained(regularizer) -> dict[str, torch.Tensor]:
        editor = make_random_tpatcher(random_tiny, vqa_source, regularizer, steps=4)
        assert editor.edit(record).ok
        params = {n: p.detach().clone()
                  for n, p in editor.patch.blocks[0].named_parameters().items()}
        if regularizer is not None:
            assert regularizer.last_terms  # its loss ran at the steps
        editor.restore()
        return params

    alone, again, regularized = trained(None), trained(None), trained(make_reg())
    assert all(torch.equal(alone[n], again[n]) for n in alone)
    assert any(not torch.equal(alone[n], regularized[n]) for n in alone)
    assert seam.changed(random_tiny.model, before) == []


def test_a_regularizer_never_sees_a_scored_prompt(random_tiny, vqa_source, monkeypatch):
    extra = seam.no_scored_prompt_reaches_the_edit(random_tiny, vqa_source, ODEdit, monkeypatch,
                                                   make_editor=make_random_tpatcher)
    assert extra > 0


def test_a_non_finite_loss_undoes_the_call(random_tiny, vqa_source):
    n_hooks = hook_count(random_tiny.model)
    editor = make_random_tpatcher(random_tiny, vqa_source)
    records = vqa_source.records("eval", limit=3)
    assert editor.edit(records[:1]).ok
    kept = editor.patch.blocks[0].values.detach().clone()
    editor.lr = float("inf")  # the first step makes the neurons inf, the next loss is not finite
    outcome = editor.edit(records[1:])
    assert not outcome.ok and "non-finite" in outcome.message
    assert len(editor.patch) == 1 and torch.equal(editor.patch.blocks[0].values, kept)
    assert len(editor.remembered) == 1
    editor.restore()
    assert hook_count(random_tiny.model) == n_hooks


def test_memory_loss_is_the_mean_of_the_top_k_exponentials():
    x = torch.tensor([[0.0, 1.0], [2.0, -5.0]])
    assert top_k_exp_mean(x, 2).item() == pytest.approx((torch.e ** 2 + torch.e) / 2)
    assert top_k_exp_mean(x, 99).item() == pytest.approx(torch.exp(x).mean().item())


@pytest.mark.parametrize("setting, value", [("activation", "tanh"), ("n_neurons", 0),
                                            ("steps", 0), ("lr", 0.0), ("memory_topk", 0),
                                            ("memory_weight", -1.0), ("memory_prompts", -1)])
def test_bad_settings_name_themselves(setting, value):
    with pytest.raises(ConfigError, match=f"editor.{setting}"):
        TPatcher(**{setting: value})


def test_a_layer_the_backbone_lacks_is_a_config_error(random_tiny, vqa_source):
    with pytest.raises(ConfigError, match="editor.layer=27"):
        TPatcher(layer=27).attach(random_tiny, vqa_source.templates, train_records=lambda: [])


def test_the_memory_needs_the_train_split(random_tiny, vqa_source):
    with pytest.raises(ConfigError, match="memory_prompts"):
        TPatcher().attach(random_tiny, vqa_source.templates)
    TPatcher(memory_prompts=0).attach(random_tiny, vqa_source.templates)  # no memory: allowed
