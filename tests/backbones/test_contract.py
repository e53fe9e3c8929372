"""The contract every backbone family passes, on randomly initialised tiny models of the real
classes: prompts and labels, image tokens, batched forward and hidden states, joint input
embeddings, FFN keys, the modality mask, the editable-module map, generation, and an FT edit
undone bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmke.backbones.base import IGNORE_INDEX, Backbone
from mmke.data.prompts import VQA_TEMPLATE, PromptTemplates
from mmke.data.record import EditRecord, LazyImage, Prompt
from mmke.editors.ft import FineTune
from tests.backbones.families import FAMILIES, build

QUESTION = VQA_TEMPLATE.format("What colour is the square?")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def backbone(request) -> Backbone:
    return build(request.param)


@pytest.fixture(scope="module")
def images(world_dir) -> list[LazyImage]:
    return [LazyImage(world_dir / "images" / "eval" / f"s0000{i}.png") for i in range(3)]


@pytest.fixture(scope="module")
def prompts(images) -> list[Prompt]:
    return [Prompt(QUESTION, "red", images[0]),
            Prompt("nq question: a photo of green", "circle", None),
            Prompt(VQA_TEMPLATE.format("What?"), "blue square", images[1]),
            Prompt(QUESTION, "green", images[0])]  # shares its picture with row 0


def test_target_only_labels_and_image_token_count(backbone, images):
    enc = backbone.encode(Prompt(QUESTION, "red", images[0]))
    ids, labels = list(enc.input_ids), list(enc.labels)
    n_target = sum(1 for t in labels if t != IGNORE_INDEX)
    assert n_target >= 1
    assert labels[:-n_target] == [IGNORE_INDEX] * (len(labels) - n_target)
    assert labels[-n_target:] == ids[-n_target:]
    assert ids.count(backbone.image_token_id) == backbone.image_token_count(images[0])
    text_only = backbone.encode(Prompt("nq question: a photo of green", "circle", None))
    assert backbone.image_token_id not in text_only.input_ids


def test_end_token_is_labelled_when_asked(backbone, images):
    plain = backbone.encode(Prompt(QUESTION, "red", images[0]))
    closed = backbone.encode(Prompt(QUESTION, "red", images[0]), append_eos=True)
    assert closed.input_ids[:-1] == plain.input_ids and closed.labels[-1] == closed.input_ids[-1]


def test_a_wrong_image_token_count_is_an_error(backbone, images):
    """BLIP-2's silent failure (image ignored when the count is off) cannot happen here."""
    placeholder = backbone.tokenizer.convert_ids_to_tokens(backbone.image_token_id) \
        if backbone.image_token_id >= 0 else None
    if placeholder is None:  # MiniGPT-4: no placeholder token in the vocabulary to smuggle in
        pytest.skip("the image placeholder id is outside the vocabulary")
    with pytest.raises(ValueError, match="image tokens"):
        backbone.encode(Prompt(f"look {placeholder} here", "red", images[0]))
    with pytest.raises(ValueError, match="image tokens"):
        backbone.encode(Prompt(f"look {placeholder} here", "red", None))


def test_batch_layout_and_modality_mask(backbone, prompts, images):
    batch = backbone.prepare(prompts)
    assert batch.attention_mask[:, -1].all()  # left padding
    counts = batch.image_token_mask.sum(1).tolist()
    assert counts == [backbone.image_token_count(images[0]), 0,
                      backbone.image_token_count(images[1]), backbone.image_token_count(images[0])]
    assert batch.image_index.tolist() == [0, 1, 0]  # each distinct picture once
    assert not (batch.image_token_mask & ~batch.attention_mask.bool()).any()


def test_mixed_batch_matches_each_prompt_alone(backbone, prompts):
    with torch.no_grad():
        batch = backbone.prepare(prompts)
        joint = backbone.target_logits(batch, backbone.forward(batch).logits)
        alone = torch.cat([backbone.target_logits(one, backbone.forward(one).logits)
                           for one in (backbone.prepare([p]) for p in prompts)])
    torch.testing.assert_close(joint, alone, atol=1e-5, rtol=1e-4)


def test_hidden_states_at_every_layer(backbone, prompts):
    batch = backbone.prepare(prompts)
    with torch.no_grad():
        out = backbone.forward(batch, output_hidden_states=True)
    n = backbone.modules.num_language_layers
    assert len(out.hidden_states) == n + 1  # embeddings, then each layer
    shape = (len(prompts), batch.input_ids.shape[1])
    assert all(h.shape[:2] == shape for h in out.hidden_states)


def test_joint_input_embeddings_are_exposed(backbone, prompts):
    """ASAM perturbs the joint [vision; text] embeddings: they must drive the forward."""
    batch = backbone.prepare(prompts)
    with torch.no_grad():
        embeds = backbone.embed(batch)
        text = backbone.model.get_input_embeddings()(
            batch.input_ids.masked_fill(batch.image_token_mask, backbone.pad_id))
        assert torch.equal(embeds[~batch.image_token_mask], text[~batch.image_token_mask])
        assert not torch.allclose(embeds[batch.image_token_mask], text[batch.image_token_mask])
        base = backbone.forward(batch).logits
        torch.testing.assert_close(backbone.forward(batch, inputs_embeds=embeds).logits, base)
        nudged = embeds + 0.5 * batch.image_token_mask.unsqueeze(-1)
        moved = backbone.forward(batch, inputs_embeds=nudged).logits
    assert not torch.allclose(moved[0], base[0])  # an image row reacts
    torch.testing.assert_close(moved[1], base[1])  # the text-only row cannot


def test_ffn_keys_enter_the_output_matrix(backbone, prompts):
    batch = backbone.prepare(prompts)
    mods = backbone.modules
    outputs = {}
    handle = mods.ffn_out(mods.resolve_layer(-1)).register_forward_hook(
        lambda _m, _a, out: outputs.setdefault("last", out))
    try:
        with torch.no_grad():
            keys = backbone.ffn_keys(batch, [0, -1])
    finally:
        handle.remove()
    last = mods.resolve_layer(-1)
    assert sorted(keys) == [0, last]
    w_out = mods.ffn_out(last)
    assert keys[last].shape == (*batch.input_ids.shape, w_out.in_features)
    torch.testing.assert_close(nn.functional.linear(keys[last], w_out.weight, w_out.bias),
                               outputs["last"].reshape(*keys[last].shape[:-1], -1))


def test_editable_modules_by_role(backbone):
    mods = backbone.modules
    n = mods.num_language_layers
    owned = {id(p) for p in backbone.model.parameters()}
    for i in (0, n - 1, -1):
        for role in ("ffn_in", "ffn_out", "attention", "layer"):
            module = mods.by_role(role, i)
            assert all(id(p) in owned for p in module.parameters())
        assert isinstance(mods.by_role("ffn_in", i), nn.Linear)
        assert isinstance(mods.by_role("ffn_out", i), nn.Linear)
    assert mods.by_role("ffn_out", 0) is not mods.by_role("ffn_out", 1)
    for role in ("projector", "vision_tower"):
        params = list(mods.by_role(role).parameters())
        assert params and all(id(p) in owned for p in params)
    vision = {id(p) for p in mods.vision_tower().parameters()}
    assert not vision & {id(p) for p in mods.language_layer(0).parameters()}
    with pytest.raises(IndexError):
        mods.by_role("ffn_out", n)


def test_generation_returns_text(backbone, prompts):
    answers = backbone.generate(prompts[:2], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_ft_edit_changes_the_answer_and_restore_is_bit_identical(backbone, images):
    record = EditRecord(uid="r0", task="vqa", src="What colour is the square?", pred="red",
                        alt="blue", rephrase="Which colour is the square?", image=images[0],
                        image_rephrase=images[1], loc="nq question: a photo of", loc_ans="green",
                        m_loc=images[2], m_loc_q="What shape is left?", m_loc_a="circle")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    editor = FineTune(layers=[-1], lr=1e-2, steps=40, early_stop_loss=None)
    editor.attach(backbone, PromptTemplates(edit=VQA_TEMPLATE))
    batch = backbone.prepare([Prompt(QUESTION, "blue", images[0])])

    def nll_and_hits() -> tuple[float, bool]:
        with torch.no_grad():
            out = backbone.forward(batch)
        hits = backbone.target_logits(batch, out.logits).argmax(-1) == batch.target_ids()
        return backbone.nll(batch, out).item(), bool(hits.all())

    nll_before, _ = nll_and_hits()
    outcome = editor.edit([record])
    assert outcome.ok and outcome.steps == 40
    nll_after, predicted = nll_and_hits()
    # an untrained model's small output head caps how likely any token gets (about 3 nats here)
    assert nll_after < nll_before - 1.5 and predicted
    editor.restore()
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_context_extends_past_the_built_length(backbone, images):
    """``extend_context`` (the tiny recipes' in-context stage): a prompt longer than the built
    context runs, and the positions it had are unchanged for a short prompt."""
    import copy

    short = [Prompt(QUESTION, "red", images[0])]
    longer = copy.deepcopy(backbone)
    before = backbone.forward(backbone.build_batch(short)).logits
    longer.extend_context(backbone.context_length + 64)
    assert longer.context_length == backbone.context_length + 64
    torch.testing.assert_close(longer.forward(longer.build_batch(short)).logits, before)
    words = ""
    while len(longer.encode(Prompt(QUESTION + words, "red", images[0])).input_ids) \
            <= backbone.context_length:
        words += " red"
    batch = longer.build_batch([Prompt(QUESTION + words, "red", images[0])])
    assert backbone.context_length < batch.input_ids.shape[1] <= longer.context_length
    assert torch.isfinite(longer.forward(batch).logits).all()
