"""Stage 1 of the tiny recipes: labels from scene annotations, and it really learns."""

import torch

from mmke.backbones.tiny.stage1 import ATTRIBUTES, Stage1Spec, column_labels, token_of_each_column
from mmke.backbones.blip2 import Blip2Backbone
from mmke.backbones.tiny.blip2 import TinyBlip2Spec, blip2_stage1, tiny_blip2_model


def test_column_labels_mark_empty_columns():
    labels = column_labels([{"shape": "square", "colour": "red", "column": "middle", "size": "big"}])
    empty = [len(ATTRIBUTES[a]) for a in ("colour", "shape", "size")]
    assert labels[0].tolist() == empty + [0] and labels[2].tolist() == empty + [2]
    assert labels[1].tolist() == [ATTRIBUTES["colour"].index("red"), ATTRIBUTES["shape"].index("square"),
                                  ATTRIBUTES["size"].index("big"), 1]


def test_scene_annotations_cover_every_picture(world_dir):
    import json

    scenes = json.loads((world_dir / "scenes.json").read_text())
    for row in json.loads((world_dir / "vqa_eval.json").read_text())[:50]:
        for key in ("image", "image_rephrase", "m_loc"):
            assert row[key] in scenes["eval"]


def test_stage1_learns_column_attributes(random_tiny, small_world):
    world = small_world
    torch.manual_seed(0)
    model = tiny_blip2_model(TinyBlip2Spec(vocab_size=300, text_layers=1), 48,
                             random_tiny.image_token_id, 0, 1, 2)
    backbone = Blip2Backbone(model, random_tiny.tokenizer, random_tiny.image_processor)
    untrained = blip2_stage1(backbone, world, Stage1Spec(steps=0))
    trained = blip2_stage1(backbone, world, Stage1Spec(steps=150, batch_size=32))
    assert trained["stage1_eval_column_accuracy"] > untrained["stage1_eval_column_accuracy"] + 0.2


def test_token_of_each_column_draws_one_row_per_picture_and_column():
    tokens = torch.arange(9.0).reshape(1, 9, 1).expand(400, 9, 1)  # row-major 3x3 grid, cell k = k
    torch.manual_seed(0)
    picked = token_of_each_column(tokens, rows=3).squeeze(-1)  # [400, 3]
    # column c holds cells c, c + 3, c + 6; every row of every column gets drawn
    assert torch.equal(picked % 3, torch.arange(3.0).expand(400, 3))
    for c in range(3):
        assert set(picked[:, c].tolist()) == {c, c + 3.0, c + 6.0}
    # rows are drawn independently per column, not one row for the whole picture
    assert not torch.equal(picked[:, 0] // 3, picked[:, 1] // 3)
