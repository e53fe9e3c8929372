"""M-ORE: Eq. 13's recursion, Eq. 12 as Eq. 11's minimiser, frozen orthonormal A over a stream,
an untouched model at step 0, pooling over one modality's positions, bit-identical restore after
100 edits, no scored prompt in an edit, and edits that move the target (tiny BLIP-2)."""

import pytest
import torch
from torch import nn

from mmke.config import build
from mmke.data.prompts import edit_prompts
from mmke.editors.lowrank import LowRankWrite, sherman_morrison
from mmke.editors.more import MORE, text_positions
from mmke.errors import ConfigError
from mmke.regularizers.base import edit_request, prompt_key, scored_prompts
from mmke.regularizers.odedit import ODEdit
from mmke.sweep.fingerprint import hook_count
from tests.conftest import compose_config
from tests.editors.conftest import state

pytestmark = pytest.mark.usefixtures("one_thread")


def make_more(backbone, source, train, **overrides) -> MORE:
    """The editor as ``python run.py editor=more backbone=tiny_blip2`` builds it."""
    editor = build(compose_config(["editor=more", "backbone=tiny_blip2"]).editor, **overrides)
    editor.attach(backbone, source.templates, train_records=lambda: train)
    return editor


def logits(backbone, prompts):
    with torch.no_grad():
        return backbone.forward(backbone.prepare(prompts)).logits


# --- the equations -----------------------------------------------------------------------------

def test_sherman_morrison_recursion_equals_the_direct_inverse_after_1000_updates():
    gen = torch.Generator().manual_seed(0)
    r, lam = 16, 50.0
    P = torch.eye(r, dtype=torch.float64) / (1 + lam)
    S = lam * torch.eye(r, dtype=torch.float64)
    for _ in range(1000):
        z = torch.randn(r, generator=gen, dtype=torch.float64) * 3
        P = sherman_morrison(P, z)  # Eq. 13
        S = S + torch.outer(z, z)  # Eq. 10
    direct = torch.linalg.inv(torch.eye(r, dtype=torch.float64) + S)
    assert (P - direct).norm() / direct.norm() < 1e-5


def test_the_closed_form_write_minimises_eq_11():
    gen = torch.Generator().manual_seed(1)
    d_out, r, eta = 6, 5, 0.3
    G = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    Z = torch.randn(r, 8, generator=gen, dtype=torch.float64)
    S = 2.0 * torch.eye(r, dtype=torch.float64) + Z @ Z.T

    def objective(dB):
        return ((dB + eta * G) ** 2).sum() + torch.trace(dB @ S @ dB.T)

    best = -eta * G @ torch.linalg.inv(torch.eye(r, dtype=torch.float64) + S)  # Eq. 12
    at = best.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(at), at)
    assert grad.abs().max() < 1e-10
    for _ in range(20):
        nudge = 1e-3 * torch.randn(d_out, r, generator=gen, dtype=torch.float64)
        assert objective(best + nudge) > objective(best)


def test_a_write_adds_exactly_scale_b_a_x_and_nothing_before_it():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    x = torch.randn(3, 12)
    plain = layer(x)
    w = LowRankWrite(layer, rank=4, scale=2.0, eta=0.5, lam=3.0,
                     generator=torch.Generator().manual_seed(0))
    assert torch.allclose(w.A @ w.A.T, torch.eye(4), atol=1e-6)  # Eq. 8
    w.hook_on()
    assert torch.equal(layer(x), plain)  # B = 0 and no write yet: untouched
    G = torch.randn(7, 4)
    w.write(G)
    expected_B = -0.5 * G.double() @ (torch.eye(4, dtype=torch.float64) / 4.0)  # P = (1+λ)⁻¹I
    assert torch.allclose(w.B, expected_B.float(), atol=1e-6)
    assert torch.allclose(layer(x), plain + 2.0 * (x @ w.A.T) @ w.B.T, atol=1e-6)
    w.remove()
    assert torch.equal(layer(x), plain)


def test_no_pooling_keeps_every_position_and_inverts_directly():
    layer = nn.Linear(10, 4)
    w = LowRankWrite(layer, rank=3, scale=1.0, eta=1.0, lam=2.0,
                     generator=torch.Generator().manual_seed(0), pooled=False)
    keys = torch.randn(5, 10)
    w.observe(keys)
    z = keys @ w.A.T
    S = 2.0 * torch.eye(3) + z.T @ z
    assert torch.allclose(w.P.float(), torch.linalg.inv(torch.eye(3) + S), atol=1e-6)


# --- on the tiny BLIP-2 ------------------------------------------------------------------------

def test_step_zero_leaves_the_model_untouched(pretrained, vqa_source, train):
    records = vqa_source.records("eval", limit=3)
    prompts = [p for r in records for p in edit_prompts(r, vqa_source.templates)]
    before, hooks = logits(pretrained, prompts), hook_count(pretrained.model)
    editor = make_more(pretrained, vqa_source, train)
    assert torch.equal(logits(pretrained, prompts), before)
    assert hook_count(pretrained.model) == hooks  # nothing is hooked before the first edit
    editor.restore()


def test_pooling_reads_only_its_modality(pretrained, vqa_source, train, monkeypatch):
    editor = make_more(pretrained, vqa_source, train)
    seen: dict[int, torch.Tensor] = {}
    for i, w in enumerate(editor.writes):
        monkeypatch.setattr(w, "observe", lambda keys, i=i: seen.__setitem__(i, keys))
    record = vqa_source.records("eval", limit=1)[0]
    editor.edit([record])
    editor.restore()  # the first edit's keys are the unedited model's
    request = edit_request(record, vqa_source.templates)
    context = pretrained.prepare([request.prompt,
                                  *editor.pool.out_of_scope(request, editor.loc_samples)])
    text = text_positions(context)
    layers = sorted(editor.language)
    keys = pretrained.ffn_keys(context, layers)
    for n, layer in enumerate(layers):
        assert torch.allclose(seen[n], keys[layer][text], atol=1e-5)  # text positions only
    assert int(text.sum()) < int(context.attention_mask.sum())  # image tokens were left out
    n_images = len(context.pixel_values)
    vision = seen[len(layers)]
    assert vision.shape == (n_images * pretrained.num_image_tokens,
                            pretrained.modules.projector_out().in_features)


def test_a_stays_frozen_and_orthonormal_and_restore_is_bit_identical_after_100_edits(
        pretrained, vqa_source, train):
    before, hooks = state(pretrained.model), hook_count(pretrained.model)
    records = vqa_source.records("eval", limit=5)
    prompts = [p for r in records for p in edit_prompts(r, vqa_source.templates)]
    reference = logits(pretrained, prompts)
    editor = make_more(pretrained, vqa_source, train)
    bases = [w.A.clone() for w in editor.writes]
    for record in train[:100]:
        assert editor.edit([record]).ok
    for w, A in zip(editor.writes, bases):
        assert torch.equal(w.A, A)
        assert torch.allclose(w.A @ w.A.T, torch.eye(w.rank), atol=1e-5)
    assert not torch.equal(logits(pretrained, prompts), reference)
    editor.restore()
    after = pretrained.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert hook_count(pretrained.model) == hooks
    assert torch.equal(logits(pretrained, prompts), reference)
    # the same A after restore: a rerun of the stream is the same experiment
    assert all(torch.equal(w.A, A) for w, A in zip(editor.writes, bases))


def test_no_freeze_moves_the_basis(pretrained, vqa_source, train):
    editor = make_more(pretrained, vqa_source, train, variant="no_freeze")
    A = editor.writes[0].A.clone()
    editor.edit(train[:1])  # ∂L/∂A is zero while B is: the basis moves from the second edit on
    assert torch.equal(editor.writes[0].A, A)
    editor.edit(train[1:2])
    assert not torch.equal(editor.writes[0].A, A)
    editor.restore()
    assert torch.equal(editor.writes[0].A, A)


def test_an_edit_moves_the_target_and_sees_no_scored_prompt(pretrained, vqa_source, train,
                                                            monkeypatch):
    records = vqa_source.records("eval", limit=10)
    editor = make_more(pretrained, vqa_source, train)
    encoded = []
    encode = pretrained.encode

    def spy(prompt, *args, **kwargs):
        encoded.append(prompt)
        return encode(prompt, *args, **kwargs)

    gains = []
    for record in records:
        edit = edit_prompts(record, vqa_source.templates)[0]
        batch = pretrained.prepare([edit])
        with torch.no_grad():
            nll_before = pretrained.nll(batch, pretrained.forward(batch))
        encoded.clear()
        monkeypatch.setattr(pretrained, "encode", spy)
        assert editor.edit([record]).ok
        monkeypatch.setattr(pretrained, "encode", encode)
        scored = {prompt_key(p) for p in scored_prompts(record, vqa_source.templates)}
        assert not [p for p in encoded if prompt_key(p) in scored]
        assert any(prompt_key(p) != prompt_key(edit) for p in encoded)  # it drew train prompts
        with torch.no_grad():
            gains.append(float(nll_before - pretrained.nll(batch, pretrained.forward(batch))))
        editor.restore()
    assert sum(g > 0 for g in gains) >= 9


def test_settings_are_checked(pretrained, vqa_source, train):
    with pytest.raises(ConfigError, match="variant"):
        MORE(variant="fast")
    with pytest.raises(ConfigError, match="reg=none"):
        MORE(regularizer=ODEdit())
    with pytest.raises(ConfigError, match="n_layers"):
        make_more(pretrained, vqa_source, train, n_layers=40)
    with pytest.raises(ConfigError, match="rank"):
        make_more(pretrained, vqa_source, train, rank=100_000)
