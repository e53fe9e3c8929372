"""The evaluator's scoring modes, Port. and the locality sets, end to end on a random tiny BLIP-2.

- ``both`` mode: FT without an end token gives teacher-forced Rel 100 while the greedy answer runs
  on (exact match 0): the Mirage case, seen through the evaluator's rows;
- unedited model: every locality metric, teacher-forced and greedy, is 100;
- ``port`` appears exactly for records with one-hop questions, averaged over them;
- each requested locality set is scored, a set the record cannot supply is a clear error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmke.data.prompts import PromptTemplates
from mmke.data.record import EditRecord, LazyImage
from mmke.editors.base import NoEdit
from mmke.editors.ft import FineTune
from mmke.errors import DataError
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from tests.backbones.families import build


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> LazyImage:
    path = Path(tmp_path_factory.mktemp("modes")) / "red.png"
    Image.new("RGB", (48, 48), (220, 30, 30)).save(path)
    return LazyImage(path)


def record(image: LazyImage, **extras) -> EditRecord:
    return EditRecord(src="What colour is the square?", pred="blue", alt="red",
                      rephrase="Which colour is the square?", image=image, image_rephrase=image,
                      loc="nq question: a photo of", loc_ans="green", m_loc=image,
                      m_loc_q="What?", m_loc_a="blue", uid="hand:0", extras=extras)


def attached(editor, backbone):
    editor.attach(backbone, PromptTemplates())
    return editor


def test_both_mode_shows_the_mirage_in_the_rows(image):
    backbone = build("blip2")
    rec = record(image)
    evaluator = Evaluator(MetricSpec(mode="both", max_new_tokens=8), PromptTemplates())
    refs = evaluator.references(backbone, [rec])
    torch.manual_seed(0)
    editor = attached(FineTune(layers=[-2, -1], lr=2e-2, steps=60, early_stop_loss=None), backbone)
    assert editor.edit([rec]).ok
    row, = evaluator.evaluate(editor, [rec], refs)
    editor.restore()
    assert row["rel"] == 1.0                      # teacher-forced: every target token is argmax
    assert row["rel_greedy"] == 0.0               # generated: runs on past "red"
    assert 0.0 < row["rel_greedy_f1"] < 1.0       # partial credit for the leading "red"
    assert row["rel_answer"].lower().startswith("red")
    for key in ("t_gen", "m_gen", "t_loc", "m_loc", "t_gen_greedy", "m_gen_greedy",
                "t_loc_greedy", "m_loc_greedy", "t_gen_greedy_f1"):
        assert key in row


def test_generate_mode_writes_only_greedy_scores(image):
    backbone = build("blip2")
    rec = record(image)
    evaluator = Evaluator(MetricSpec(mode="generate", max_new_tokens=4), PromptTemplates())
    refs = evaluator.references(backbone, [rec])
    row, = evaluator.evaluate(attached(NoEdit(), backbone), [rec], refs)
    assert "rel" not in row and "m_loc" not in row
    assert row["t_loc_greedy"] == 1.0 and row["m_loc_greedy"] == 1.0  # unedited = reference
    assert evaluator.forwards == 0 and evaluator.generations == 2


def test_unedited_model_keeps_every_locality_at_100(image):
    backbone = build("blip2")
    rec = record(image, loc_same_image_q="How many objects are there?", loc_same_image_a="one",
                 loc_similar_image=image, loc_similar_image_a="red")
    sets = ("same_image", "similar_image", "no_image")
    for positions in ("easyedit", "text", "target", "first"):
        evaluator = Evaluator(MetricSpec(loc_positions=positions, locality_sets=sets),
                              PromptTemplates())
        refs = evaluator.references(backbone, [rec])
        row, = evaluator.evaluate(attached(NoEdit(), backbone), [rec], refs)
        for key in ("t_loc", "m_loc", "loc_same_image", "loc_similar_image", "loc_no_image"):
            assert row[key] == 1.0, (positions, key)


def test_port_is_scored_only_for_records_with_one_hop_questions(image):
    backbone = build("blip2")
    hops = [{"port_q": "What shape is the red object?", "port_a": "square"},
            {"port_q": "What shape is red?", "port_a": "square"}]
    with_port, without = record(image, port_new=hops), record(image)
    evaluator = Evaluator(MetricSpec(), PromptTemplates())
    items = [i for i in evaluator.items(with_port) if i.metric == "port"]
    assert [i.prompt.target for i in items] == ["square", "square"]
    assert all(i.prompt.image == image for i in items)
    refs = evaluator.references(backbone, [with_port, without])
    rows = evaluator.evaluate(attached(NoEdit(), backbone), [with_port, without], refs)
    assert 0.0 <= rows[0]["port"] <= 1.0 and "port" not in rows[1]


def test_a_locality_set_the_record_cannot_supply_is_named(image):
    backbone = build("blip2")
    evaluator = Evaluator(MetricSpec(locality_sets=("similar_image",)), PromptTemplates())
    with pytest.raises(DataError, match="similar_image"):
        evaluator.references(backbone, [record(image)])


class RecordingFT(FineTune):
    """FT that remembers what it was asked to edit."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.requests: list = []

    def _apply(self, records):
        self.requests.append(list(records))
        return super()._apply(records)


def test_port_edit_scores_port_after_vlkebs_second_text_only_edit(image):
    from mmke.protocols.single import SingleEdit

    backbone = build("blip2")
    hop = {"port_q": "What shape is the red object?", "port_a": "square",
           "port_edit_q": "What shape is red?", "port_edit_a": "square"}
    rec = record(image, port_new=[hop])
    before = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    rows = {}
    for port_edit in (False, True):
        evaluator = Evaluator(MetricSpec(port_edit=port_edit), PromptTemplates())
        editor = attached(RecordingFT(layers=[-1], steps=5), backbone)
        rows[port_edit], = SingleEdit().run(editor, evaluator, [rec], lambda row: None,
                                            progress=False)
        if port_edit:
            main, second = editor.requests
            assert main == [rec]
            (request,) = second  # text only, nothing else of the record
            assert (request.src, request.alt, request.image) == ("What shape is red?", "square", None)
        else:
            assert editor.requests == [[rec]]
        assert rows[port_edit]["port"] is not None
    after = backbone.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # both edits undone
    assert rows[True]["rel"] == rows[False]["rel"]  # the main metrics precede the second edit


def test_port_edit_needs_the_single_protocol(image):
    from mmke.errors import ConfigError
    from mmke.protocols.sequential import Sequential

    backbone = build("blip2")
    evaluator = Evaluator(MetricSpec(port_edit=True), PromptTemplates())
    with pytest.raises(ConfigError, match="protocol=single"):
        Sequential(T=1).run(attached(NoEdit(), backbone), evaluator, [record(image)],
                            lambda row: None, progress=False)
