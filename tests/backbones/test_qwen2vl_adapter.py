"""The Qwen2-VL adapter contract on an untrained tiny model: layout, labels, M-RoPE positions,
batching, generation, loading."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmke.backbones.base import IGNORE_INDEX
from mmke.backbones.qwen2vl import (QWEN2VL_PROMPT, QWEN2VL_TEXT_PROMPT, TURN_END, Qwen2VLBackbone,
                                    load_qwen2vl, save_qwen2vl)
from mmke.backbones.tiny.qwen2vl import (QWEN_MARKERS, TinyQwen2VLSpec, mrope_section,
                                         qwen2vl_stage1, tiny_image_processor, tiny_qwen2vl_model)
from mmke.backbones.tiny.stage1 import Stage1Spec
from mmke.backbones.tiny.tokenizer import train_tokenizer
from mmke.data.record import LazyImage, Prompt
from mmke.errors import WeightsNotFoundError

VQA = "Question: What colour is the square? Short answer:"


@pytest.fixture(scope="module")
def qwen(world_dir) -> Qwen2VLBackbone:
    """An untrained tiny Qwen2-VL with a real tokenizer (Qwen's markers kept whole)."""
    torch.manual_seed(0)
    corpus = [QWEN2VL_PROMPT.format(VQA + " red blue"), QWEN2VL_TEXT_PROMPT.format("nq question:"),
              "a photo of green circle"]
    tokenizer = train_tokenizer(corpus, 300, extra_special=QWEN_MARKERS)
    tokenizer.eos_token = TURN_END
    ids = {m: tokenizer.convert_tokens_to_ids(m) for m in QWEN_MARKERS}
    spec = TinyQwen2VLSpec(vocab_size=300, vision_layers=2, text_layers=3)
    model = tiny_qwen2vl_model(spec, ids["<|image_pad|>"], ids["<|video_pad|>"],
                               ids["<|vision_start|>"], ids["<|vision_end|>"],
                               tokenizer.pad_token_id, ids[TURN_END])
    return Qwen2VLBackbone(model, tokenizer, tiny_image_processor(spec, 48), name="random_qwen")


@pytest.fixture(scope="module")
def image(world_dir) -> LazyImage:
    return LazyImage(world_dir / "images" / "eval" / "s00000.png")


@pytest.fixture(scope="module")
def other_image(world_dir) -> LazyImage:
    return LazyImage(world_dir / "images" / "eval" / "s00001.png")


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory) -> LazyImage:
    """A picture of another size and shape: another grid and token count (dynamic resolution)."""
    path = tmp_path_factory.mktemp("wide") / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 80, 3), dtype=np.uint8)).save(path)
    return LazyImage(path)


def tokens(b: Qwen2VLBackbone, text: str) -> list[int]:
    return b.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tiny_mrope_sections_fill_half_the_head():
    assert mrope_section(128) == [16, 24, 24]  # the real Qwen2-VL-7B split
    assert sum(mrope_section(32)) == 16


def test_image_prompt_layout_and_target_only_labels(qwen, image):
    b = qwen
    enc = b.encode(Prompt(VQA, "red", image), append_eos=True)
    head, tail = QWEN2VL_PROMPT.split("<|image_pad|>")
    n = 9  # 48 px, 8 px patches, 2x2 merging: 3x3 image tokens
    expected = (tokens(b, head) + [b.image_token_id] * n + tokens(b, tail.format(VQA)))
    target = tokens(b, "red") + [b.tokenizer.convert_tokens_to_ids(TURN_END)]
    assert list(enc.input_ids) == expected + target
    assert list(enc.labels) == [IGNORE_INDEX] * len(expected) + target


def test_text_prompt_has_no_vision_block(qwen):
    b = qwen
    enc = b.encode(Prompt("nq question: a photo of", "green", None))
    assert b.image_token_id not in enc.input_ids
    prompt = QWEN2VL_TEXT_PROMPT.format("nq question: a photo of")
    assert list(enc.input_ids) == tokens(b, prompt + "green")


def test_image_token_count_follows_the_picture_size(qwen, image, wide_image):
    b = qwen
    (_, grid), = b.patches([wide_image])
    assert grid.tolist()[0] == 1 and grid.tolist() != [1, 6, 6]
    enc = b.encode(Prompt(VQA, "red", wide_image))
    assert enc.input_ids.count(b.image_token_id) == b.image_token_count(wide_image)
    assert b.image_token_count(wide_image) == int(grid.prod()) // 4
    assert b.encode(Prompt(VQA, "red", image)).input_ids.count(b.image_token_id) == 9


def test_placeholder_in_the_prompt_text_is_an_error(qwen, image):
    with pytest.raises(ValueError, match="image tokens"):
        qwen.encode(Prompt("look <|image_pad|> here", "red", image))
    with pytest.raises(ValueError, match="image tokens"):
        qwen.encode(Prompt("look <|image_pad|> here", "red", None))


def test_prompt_format_must_hold_the_placeholder_once(qwen):
    with pytest.raises(ValueError, match="prompt_format"):
        Qwen2VLBackbone(qwen.model, qwen.tokenizer, qwen.image_processor, prompt_format="{}")


def test_merged_tokens_are_row_major_over_the_picture(qwen):
    """Patch block k (4 patches, merged into image token k) covers cell (k // 3, k % 3): so
    ``token_of_each_column(tokens, rows=3)`` reads a token of each column of the picture."""
    cells = np.zeros((48, 48, 3), dtype=np.uint8)
    for k in range(9):
        cells[16 * (k // 3):16 * (k // 3 + 1), 16 * (k % 3):16 * (k % 3 + 1)] = 20 * k
    patches, grid = qwen._process_images([Image.fromarray(cells)])
    assert grid.tolist() == [[1, 6, 6]]
    means = patches.view(9, 4, -1).mean((1, 2))
    assert torch.all(means[1:] > means[:-1])


def test_forward_equals_the_native_forward(qwen, image):
    """The adapter's joint embeddings + explicit M-RoPE positions equal the model's own path."""
    b = qwen
    batch = b.prepare([Prompt(VQA, "red", image)])
    with torch.no_grad():
        ours = b.forward(batch).logits
        native = b.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=batch.image_token_mask.int()).logits
    torch.testing.assert_close(ours, native, atol=1e-5, rtol=1e-4)
    positions = b.position_ids(batch)
    image_pos = positions[:, 0, batch.image_token_mask[0]]
    assert image_pos[1].tolist() == [image_pos[1, 0].item() + k // 3 for k in range(9)]  # rows
    assert image_pos[2].tolist() == [image_pos[2, 0].item() + k % 3 for k in range(9)]  # columns


def test_text_only_forward_equals_the_native_forward(qwen):
    b = qwen
    batch = b.prepare([Prompt("nq question: a photo of", "green", None)])
    with torch.no_grad():
        ours = b.forward(batch).logits
        native = b.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours, native, atol=1e-5, rtol=1e-4)


def test_mixed_batch_matches_each_prompt_alone(qwen, image, other_image, wide_image):
    """Left padding, image and text rows, a shared picture and one of another size: each row's
    target logits equal its own forward (positions ignore the padding, images their neighbours)."""
    b = qwen
    prompts = [Prompt(VQA, "red", image),
               Prompt("nq question: a photo of green", "circle", None),
               Prompt("Question: What? Short answer:", "blue square", other_image),
               Prompt("a photo of", "a red square", image),
               Prompt("Question: x Short answer:", "green", wide_image)]
    batch = b.prepare(prompts)
    assert batch.pixel_values.shape[0] == sum(b.patches([im])[0][0].shape[0]
                                              for im in (image, other_image, wide_image))
    assert batch.image_grid_thw.shape == (3, 3)
    assert batch.image_index.tolist() == [0, 1, 0, 2]
    assert batch.image_token_mask.sum(1).tolist()[:4] == [9, 0, 9, 9]
    with torch.no_grad():
        joint = b.target_logits(batch, b.forward(batch).logits)
        alone = torch.cat([b.target_logits(one, b.forward(one).logits)
                           for one in (b.prepare([p]) for p in prompts)])
    torch.testing.assert_close(joint, alone, atol=1e-5, rtol=1e-4)


def test_embed_puts_image_features_at_image_tokens(qwen, image, other_image):
    b = qwen
    batch = b.prepare([Prompt("Question: x Short answer:", "red", other_image),
                       Prompt("Question: y Short answer:", "red", image)])
    with torch.no_grad():
        embeds = b.embed(batch)
        features = b.merged_features(batch.pixel_values, batch.image_grid_thw)
    torch.testing.assert_close(embeds[1][batch.image_token_mask[1]], features[1])


def test_image_changes_the_prediction(qwen, image, other_image):
    b = qwen
    with torch.no_grad():
        a = b.forward(b.prepare([Prompt("Question: x Short answer:", "red", image)])).logits
        c = b.forward(b.prepare([Prompt("Question: x Short answer:", "red", other_image)])).logits
    assert not torch.allclose(a, c)


def test_hidden_states_for_every_layer(qwen, image):
    b = qwen
    out = b.forward(b.prepare([Prompt("Question: x Short answer:", "red", image)]),
                    output_hidden_states=True)
    assert len(out.hidden_states) == b.modules.num_language_layers + 1


def test_modules_by_role(qwen):
    m = qwen.modules
    layer = qwen.model.model.language_model.layers[-1]
    assert m.ffn_in(-1) is layer.mlp.up_proj and m.by_role("ffn_gate", -1) is layer.mlp.gate_proj
    assert m.ffn_out(-1) is layer.mlp.down_proj and m.attention(-1) is layer.self_attn
    assert m.projector() is qwen.model.model.visual.merger
    assert m.vision_tower() is qwen.model.model.visual
    keys = qwen.ffn_keys(qwen.prepare([Prompt("nq question: y", "green", None)]), [0, -1])
    assert keys[2].shape[-1] == m.ffn_out(2).in_features


def test_generate_returns_text_and_agrees_with_forward(qwen, image, other_image):
    b = qwen
    prompts = [Prompt("Question: x Short answer:", "", image), Prompt("nq question: y", "", None),
               Prompt("a photo of", "", other_image)]
    out = b.generate(prompts, max_new_tokens=3)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    assert out == [b.generate([p], max_new_tokens=3)[0] for p in prompts]
    # the first generated token is the forward's argmax at the end of the prompt
    first = b.generate([prompts[0]], max_new_tokens=1)[0]
    batch = b.collate([b.encode(prompts[0], with_target=False)])
    with torch.no_grad():
        top = b.forward(batch).logits[0, -1].argmax().item()
    assert first == b.tokenizer.decode([top], skip_special_tokens=True).strip()


def test_save_and_load_roundtrip_through_the_real_loader(qwen, image, tmp_path: Path):
    save_qwen2vl(qwen, tmp_path)
    loaded = load_qwen2vl(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.end_id == qwen.end_id and loaded.image_token_id == qwen.image_token_id
    prompts = [Prompt(VQA, "red", image), Prompt("nq question: y", "green", None)]
    assert [loaded.encode(p) for p in prompts] == [qwen.encode(p) for p in prompts]
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(loaded.prepare(prompts)).logits,
                                   qwen.forward(qwen.prepare(prompts)).logits)
    capped = load_qwen2vl(str(tmp_path), device="cpu", max_pixels=16 * 16)
    assert capped.encode(prompts[0]).input_ids.count(capped.image_token_id) == 1


@pytest.mark.parametrize("path, needle", [(None, "backbone.path is not set"),
                                          ("/nonexistent/qwen2vl", "no weights at backbone.path")])
def test_missing_weights_say_which_setting(path, needle):
    with pytest.raises(WeightsNotFoundError, match=needle):
        load_qwen2vl(path)


def test_folder_without_config_is_reported(tmp_path: Path):
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        load_qwen2vl(str(tmp_path))


def test_stage1_learns_column_attributes_from_merged_tokens(qwen, small_world):
    world = small_world
    torch.manual_seed(0)
    ids = {m: qwen.tokenizer.convert_tokens_to_ids(m) for m in QWEN_MARKERS}
    spec = TinyQwen2VLSpec(vocab_size=300, vision_layers=2, text_layers=1)
    model = tiny_qwen2vl_model(spec, ids["<|image_pad|>"], ids["<|video_pad|>"],
                               ids["<|vision_start|>"], ids["<|vision_end|>"], 0, ids[TURN_END])
    backbone = Qwen2VLBackbone(model, qwen.tokenizer, qwen.image_processor)
    untrained = qwen2vl_stage1(backbone, world, Stage1Spec(steps=0))
    trained = qwen2vl_stage1(backbone, world, Stage1Spec(steps=150, batch_size=32))
    assert trained["stage1_eval_column_accuracy"] > untrained["stage1_eval_column_accuracy"] + 0.2
