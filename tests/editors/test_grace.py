"""GRACE: edits flip the target; restore is bit-identical after a stream; the codebook grows
only for keys outside every reach (Algorithm 1); inputs far from every key are untouched.

Each model test runs on the tiny BLIP-2 and on the Llama-style tiny LLaVA with the per-family
settings Hydra composes (``editor=grace backbone=<family>``). The tiny LLaVA cases are marked
slow: its first use pretrains it (several minutes on 2 cores)."""

from dataclasses import replace

import pytest
import torch

from mmke.config import build
from mmke.data.prompts import edit_prompts
from mmke.editors.grace import SPLIT_GAP, Codebook, Grace
from mmke.errors import ConfigError
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.sequential import Sequential
from mmke.sweep.fingerprint import hook_count, model_fingerprint
from tests.conftest import compose_config
from tests.editors.answered import answered_record
from tests.editors.conftest import composed, single_edit_rel, state

pytestmark = pytest.mark.usefixtures("one_thread")


def make_grace(family: str, **overrides):
    """The editor as ``python run.py editor=grace backbone=<family>`` builds it."""
    return composed("grace", family, **overrides)


@pytest.fixture
def grace(family, backbone, vqa_source):
    editor = make_grace(family)
    editor.attach(backbone, vqa_source.templates)
    yield editor
    editor.restore()


def test_single_edits_flip_the_target(grace, vqa_source):
    """Rel >= 90% over 20 single edits, scored by the real evaluator."""
    rel = single_edit_rel(grace, vqa_source)
    assert rel >= 90.0, rel


def test_restore_is_bit_identical_after_a_20_edit_stream(grace, backbone, vqa_source):
    records = vqa_source.records("eval", limit=20)
    model = backbone.model
    before, fingerprint = state(model), model_fingerprint(model)
    evaluator = Evaluator(MetricSpec(), vqa_source.templates)
    rows = Sequential(T=20).run(grace, evaluator, records, sink=lambda row: None, progress=False)
    rel = sum(r["rel"] for r in rows) / len(rows)  # scored with all 20 edits in place
    assert rel >= 90.0, rel
    # the protocol restored: every weight bit for bit; flags, modes and hooks as before
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []
    assert model_fingerprint(model) == fingerprint
    assert len(grace.codebook) == 0 and grace.codebook.keys is None


def test_a_stream_grows_the_codebook_and_restore_removes_it(grace, backbone, vqa_source):
    records = vqa_source.records("eval", limit=20)
    probe = backbone.prepare([edit_prompts(r, vqa_source.templates)[0] for r in records[:4]])
    with torch.no_grad():
        unedited = backbone.forward(probe).logits
    n_hooks = hook_count(backbone.model)
    for record in records:
        assert grace.edit([record]).ok
    assert len(grace.codebook) >= 10 and hook_count(backbone.model) == n_hooks + 1
    with torch.no_grad():
        assert not torch.equal(grace.forward(probe).logits, unedited)
    grace.restore()
    assert hook_count(backbone.model) == n_hooks
    with torch.no_grad():
        assert torch.equal(grace.forward(probe).logits, unedited)
        assert torch.equal(backbone.forward(probe).logits, unedited)


def test_codebook_grows_only_for_keys_outside_every_reach():
    """Algorithm 1 on hand-built keys (eps_init 1): a same-label key adds an entry only beyond
    eps_init + eps of its nearest key; inside that reach it expands the radius (or changes nothing);
    a different label inside it splits the two radii to d/2."""
    book = Codebook(eps_init=1.0)
    x, y, z = torch.eye(3)
    value = torch.zeros(2)
    assert book.admit(0 * x, "red", value) == (0, "add")
    assert book.admit(0.5 * x, "red", value) == (0, "within")  # inside the radius
    assert len(book) == 1 and book.radii.tolist() == [1.0]
    assert book.admit(1.5 * x, "red", value) == (0, "expand")  # 1 < d <= 1 + 1
    assert len(book) == 1 and book.radii.tolist() == [1.5]
    assert book.admit(2.4 * y, "red", value) == (0, "expand")  # 1.5 < d <= 1 + 1.5
    assert len(book) == 1 and book.radii[0].item() == pytest.approx(2.4)
    assert book.admit(3.5 * y, "red", value) == (1, "add")  # d = 3.5 > 1 + 2.4
    assert len(book) == 2 and book.radii[1].item() == 1.0
    assert book.admit(3.5 * y + 0.8 * z, "blue", value) == (2, "split")  # other label, d = 0.8
    assert len(book) == 3
    assert book.radii[1].item() == pytest.approx(0.4 - SPLIT_GAP)
    assert book.radii[2].item() == pytest.approx(0.4)
    # reads: each half of the split answers for its own side; a far query hits nothing
    index, hit = book.lookup(torch.stack([3.5 * y + 0.1 * z, 3.5 * y + 0.7 * z, 9 * z]))
    assert index[:2].tolist() == [1, 2] and hit.tolist() == [True, True, False]


def test_codebook_growth_follows_the_nearest_key_rule_on_random_keys():
    """200 random same-label keys in the plane: the codebook grows exactly when the new key lies
    beyond eps_init + eps_i* of its nearest key i*, the distance computed here by hand."""
    gen = torch.Generator().manual_seed(0)
    book = Codebook(eps_init=0.3)
    grew = expected = 0
    for point in torch.rand(200, 2, generator=gen) * 4:
        if len(book):
            d = ((book.keys - point) ** 2).sum(dim=1).sqrt()
            i = int(d.argmin())
            expected += bool(d[i] > 0.3 + book.radii[i])
        else:
            expected += 1
        size = len(book)
        book.admit(point, "red", torch.zeros(1))
        grew += len(book) - size
    assert grew == expected and 1 < grew < 200


def test_repeated_and_conflicting_edits_on_the_model(grace, vqa_source):
    """The same edit again lies inside its entry's radius: no new entry. The same prompt with
    another target splits. A prompt beyond every reach adds one."""
    first, *others = vqa_source.records("eval", limit=20)
    assert grace.edit([first]).extra["n_add"] == 1 and len(grace.codebook) == 1
    assert grace.edit([first]).extra["n_within"] == 1 and len(grace.codebook) == 1
    conflict = replace(first, alt=first.pred)
    assert grace.edit([conflict]).extra["n_split"] == 1 and len(grace.codebook) == 2
    queries = grace.queries([edit_prompts(r, vqa_source.templates)[0] for r in others])
    dist, nearest = grace.codebook.nearest(queries)
    beyond = dist > grace.eps_init + grace.codebook.radii[nearest]
    far = others[int(beyond.nonzero()[0])]
    assert grace.edit([far]).extra["n_add"] == 1 and len(grace.codebook) == 3


def test_inputs_far_from_every_key_are_untouched(grace, backbone, vqa_source):
    records = vqa_source.records("eval", limit=30)
    edited, unrelated = records[:10], records[10:]
    prompts = [p for r in edited for p in edit_prompts(r, vqa_source.templates)[3:]]  # T/M-Loc
    prompts += [edit_prompts(r, vqa_source.templates)[0] for r in unrelated]  # other questions
    batch = backbone.prepare(prompts)
    own = backbone.prepare([edit_prompts(r, vqa_source.templates)[0] for r in edited])
    with torch.no_grad():
        unedited, own_unedited = backbone.forward(batch).logits, backbone.forward(own).logits
    for record in edited:
        assert grace.edit([record]).ok
    _, hit = grace.codebook.lookup(grace.queries(prompts))
    far = ~hit
    assert far.float().mean() >= 0.9, far.float().mean()
    with torch.no_grad():
        assert torch.equal(grace.forward(batch).logits[far], unedited[far])  # bit for bit
        # the edited prompts themselves do change: the comparison can fail
        assert not torch.equal(grace.forward(own).logits, own_unedited)


def test_greedy_answers_go_through_the_codebook(grace, backbone, vqa_source):
    record, rel = answered_record(backbone, vqa_source)
    grace.edit([record])
    assert grace.generate([rel], max_new_tokens=8)[0].startswith(record.alt)
    with pytest.raises(RuntimeError, match="Grace.forward and Grace.generate"):
        backbone.generate([rel])  # the bare backbone cannot say where a prompt ends
    grace.restore()
    assert grace.generate([rel], max_new_tokens=8)[0] == record.pred


def test_a_non_finite_loss_undoes_the_call(grace, vqa_source):
    records = vqa_source.records("eval", limit=3)
    assert grace.edit(records[:1]).ok
    kept = grace.codebook.values[0].detach().clone()
    grace.lr = float("inf")  # the first step makes the value inf, the next loss is not finite
    outcome = grace.edit(records[1:])
    assert not outcome.ok and "non-finite" in outcome.message
    assert len(grace.codebook) == 1 and torch.equal(grace.codebook.values[0], kept)


def test_grace_refuses_a_regularizer():
    cfg = compose_config(["editor=grace", "reg=odedit"])
    with pytest.raises(ConfigError, match="reg=odedit"):
        build(cfg.editor, regularizer=build(cfg.reg))


@pytest.mark.parametrize("setting, value", [("role", "attention"), ("value_init", "hot"),
                                            ("replace", "all"), ("eps_init", 0.0), ("steps", 0),
                                            ("lr", -1.0)])
def test_bad_settings_name_themselves(setting, value):
    with pytest.raises(ConfigError, match=f"editor.{setting}"):
        Grace(**{setting: value})


def test_a_layer_the_backbone_lacks_is_a_config_error(pretrained, vqa_source):
    with pytest.raises(ConfigError, match="editor.layer=27"):
        Grace(layer=27).attach(pretrained, vqa_source.templates)


@pytest.mark.parametrize("backbone_name, layer", [("tiny_blip2", 2), ("tiny_llava", 2),
                                                  ("tiny_minigpt4", 3), ("tiny_qwen2vl", 2),
                                                  ("blip2", 27), ("llava", 27), ("minigpt4", 27),
                                                  ("qwen2vl", 18)])
def test_every_family_composes_its_settings(backbone_name, layer):
    editor = make_grace(backbone_name)
    assert isinstance(editor, Grace) and editor.layer == layer and editor.role == "ffn_out"


@pytest.mark.parametrize("family_name", ["blip2", "llava", "minigpt4", "qwen2vl"])
def test_every_family_reads_the_codebook_in_forward_and_generation(tmp_path, family_name):
    """Contract on a random tiny model of each family (built in well under a second, no
    knowledge needed): the edit lowers its NLL, teacher-forced forward and KV-cached greedy
    decoding both pass through the codebook, a far prompt is untouched, restore leaves the
    model's fingerprint as it was."""
    from PIL import Image

    from mmke.data.prompts import PromptTemplates
    from mmke.data.record import EditRecord, LazyImage
    from tests.backbones.families import build as build_random

    backbone = build_random(family_name)
    Image.new("RGB", (48, 48), (200, 20, 20)).save(tmp_path / "im.png")
    image = LazyImage(tmp_path / "im.png")
    record = EditRecord(src="What colour is the square?", pred="blue", alt="red", rephrase="x",
                        image=image, image_rephrase=image, loc="nq question: a photo of",
                        loc_ans="green", m_loc=image, m_loc_q="What?", m_loc_a="blue")
    templates = PromptTemplates()
    rel, _, _, t_loc, _ = edit_prompts(record, templates)
    # a random model's FFN activations have their own scale: the radius is half the distance
    # between the two prompts' keys, so one is inside and one outside
    probe = Grace(layer=1)
    probe.attach(backbone, templates)
    keys = probe.queries([rel, t_loc])
    editor = Grace(layer=1, eps_init=0.5 * (keys[0] - keys[1]).norm().item(), lr=0.1, steps=10,
                   replace="key_onward")
    editor.attach(backbone, templates)
    fingerprint = model_fingerprint(backbone.model)
    batch = backbone.prepare([rel, t_loc])
    with torch.no_grad():
        unedited = backbone.forward(batch)
        answers = backbone.generate([rel, t_loc], max_new_tokens=4)
    assert editor.edit([record]).ok
    _, hit = editor.codebook.lookup(editor.queries([rel, t_loc]))
    assert hit.tolist() == [True, False]
    with torch.no_grad():
        edited = editor.forward(batch)
        before, after = (backbone.nll(batch, out, reduction="none")[0]
                         for out in (unedited, edited))
        assert after < before
        assert torch.equal(edited.logits[1], unedited.logits[1])
    calls = []
    handle = editor._module.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    try:
        generated = editor.generate([rel, t_loc], max_new_tokens=4)
    finally:
        handle.remove()
    assert len(calls) > 1  # the prompt's forward, then decoding steps through the same module
    assert generated[1] == answers[1]
    editor.restore()
    assert model_fingerprint(backbone.model) == fingerprint
    assert backbone.generate([rel, t_loc], max_new_tokens=4) == answers
