"""FT on the pretrained tiny BLIP-2: edits flip the answer, restore is bit-identical."""

import pytest
import torch

from mmke.editors.ft import FineTune
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.single import SingleEdit
from mmke.regularizers.base import Regularizer
from tests.editors.answered import answered_record


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed == [], f"not restored: {changed[:5]}"


@pytest.fixture
def ft(pretrained, vqa_source):
    editor = FineTune()
    editor.attach(pretrained, vqa_source.templates)
    return editor


def test_restore_is_bit_identical_after_50_single_edits(ft, pretrained, vqa_source):
    before = state(pretrained.model)
    for record in vqa_source.records("eval", limit=50):
        outcome = ft.edit([record])
        assert outcome.ok and outcome.steps >= 1
        ft.restore()
    assert_bit_identical(pretrained.model, before)
    assert all(p.requires_grad for p in pretrained.model.parameters())


def test_restore_copies_only_the_edited_tensors(ft, vqa_source):
    ft.edit(vqa_source.records("eval", limit=1))
    assert len(ft.snapshot) == 3 * 2 * 2  # three layers x (ffn_in, ffn_out) x (weight, bias)
    ft.restore()
    assert len(ft.snapshot) == 0


def test_sequential_edits_restore_to_the_original(ft, pretrained, vqa_source):
    before = state(pretrained.model)
    for record in vqa_source.records("eval", limit=5):
        ft.edit([record])
    ft.restore()
    assert_bit_identical(pretrained.model, before)


def test_the_edit_changes_the_generated_answer(ft, pretrained, vqa_source):
    record, rel = answered_record(pretrained, vqa_source)
    ft.edit([record])
    # FT trains the target tokens only (as EasyEdit), not an end token: check the answer begins it
    assert pretrained.generate([rel])[0].startswith(record.alt)
    ft.restore()
    assert pretrained.generate([rel])[0] == record.pred


def test_ft_reaches_95_percent_reliability_on_mini_vqa(ft, pretrained, vqa_source):
    records = vqa_source.records("eval", limit=50)
    evaluator = Evaluator(MetricSpec(), vqa_source.templates)
    rows = SingleEdit().run(ft, evaluator, records, sink=lambda row: None, progress=False)
    rel = sum(r["rel"] for r in rows) / len(rows)
    assert rel >= 95.0, rel


class NaNRegularizer(Regularizer):
    """A regularizer whose loss is NaN from the third step: a real source of a failed edit."""

    def loss(self, step):
        return step.task_loss.new_tensor(float("nan") if step.step >= 2 else 0.0)


def test_non_finite_loss_fails_the_edit_and_undoes_it(pretrained, vqa_source):
    editor = FineTune(early_stop_loss=None)
    editor.attach(pretrained, vqa_source.templates)
    records = vqa_source.records("eval", limit=2)
    editor.edit(records[:1])  # a good edit first: it must survive the failed one
    after_first = state(pretrained.model)
    editor.regularizer = NaNRegularizer()
    outcome = editor.edit(records[1:])
    assert not outcome.ok and "non-finite" in outcome.message
    assert_bit_identical(pretrained.model, after_first)
    editor.restore()


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="editor.steps"):
        FineTune(steps=0)


def _random_tiny_edit(tmp_path, append_eos: bool):
    """One FT step on a random tiny BLIP-2; returns the backbone and the batch FT trained on."""
    from PIL import Image

    from mmke.data.prompts import PromptTemplates
    from mmke.data.record import EditRecord, LazyImage
    from tests.backbones.families import build

    backbone = build("blip2")
    Image.new("RGB", (48, 48), (200, 20, 20)).save(tmp_path / "im.png")
    image = LazyImage(tmp_path / "im.png")
    record = EditRecord(src="What colour is the square?", pred="blue", alt="red", rephrase="x",
                        image=image, image_rephrase=image, loc="nq question: a photo of",
                        loc_ans="green", m_loc=image, m_loc_q="What?", m_loc_a="blue")
    seen = []
    prepare = backbone.prepare

    def spy(prompts, append_eos=False):
        seen.append(prepare(prompts, append_eos=append_eos))
        return seen[-1]

    backbone.prepare = spy
    editor = FineTune(steps=1, append_eos=append_eos)
    editor.attach(backbone, PromptTemplates())
    before = state(backbone.model)
    assert editor.edit([record]).ok
    editor.restore()
    assert_bit_identical(backbone.model, before)
    return backbone, seen[0]


@pytest.mark.parametrize("append_eos", [False, True])
def test_append_eos_labels_the_end_token_after_the_target(tmp_path, append_eos):
    backbone, batch = _random_tiny_edit(tmp_path, append_eos)
    targets = batch.target_ids().tolist()
    assert (targets[-1] == backbone.eos_id) is append_eos
    assert backbone.eos_id not in targets[:-1]


@pytest.mark.parametrize("name", ["ft", "ft_l", "ft_m"])
def test_ft_configs_train_the_target_without_an_end_token_by_default(name):
    """EasyEdit's FT convention; editor.append_eos=true is the opt-in."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "editor" / f"{name}.yaml")
    assert conf.append_eos is False
    assert instantiate(conf).append_eos is False
    assert instantiate(conf, append_eos=True).append_eos is True
