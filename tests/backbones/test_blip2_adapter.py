"""The BLIP-2 adapter contract on an untrained tiny model: layout, labels, batching, loading."""

from pathlib import Path

import pytest
import torch

from mmke.backbones.base import IGNORE_INDEX
from mmke.backbones.blip2 import load_blip2, save_blip2
from mmke.data.record import LazyImage, Prompt
from mmke.errors import WeightsNotFoundError


@pytest.fixture(scope="module")
def image(world_dir) -> LazyImage:
    return LazyImage(world_dir / "images" / "eval" / "s00000.png")


@pytest.fixture(scope="module")
def other_image(world_dir) -> LazyImage:
    return LazyImage(world_dir / "images" / "eval" / "s00001.png")


def test_image_prompt_layout_and_target_only_labels(random_tiny, image):
    b = random_tiny
    enc = b.encode(Prompt("Question: What colour is the square? Short answer:", "red", image))
    q = b.num_image_tokens
    assert list(enc.input_ids[:q]) == [b.image_token_id] * q
    assert enc.input_ids[q] == b.bos_id
    target = b.tokenizer(" red", add_special_tokens=False)["input_ids"]
    assert list(enc.input_ids[-len(target):]) == target
    assert list(enc.labels) == [IGNORE_INDEX] * (len(enc.labels) - len(target)) + target


def test_text_prompt_has_no_image_tokens(random_tiny):
    enc = random_tiny.encode(Prompt("nq question: a photo of", "green", None))
    assert random_tiny.image_token_id not in enc.input_ids


def test_wrong_image_token_count_is_an_error(random_tiny, image):
    with pytest.raises(ValueError, match="image tokens"):
        random_tiny.encode(Prompt("look <image> here", "red", image))
    with pytest.raises(ValueError, match="image tokens"):
        random_tiny.encode(Prompt("look <image> here", "red", None))


def test_mixed_batch_matches_each_prompt_alone(random_tiny, image, other_image):
    """Left padding, mixed image/text rows: each row's target logits equal its own forward."""
    b = random_tiny
    prompts = [Prompt("Question: What colour is the square? Short answer:", "red", image),
               Prompt("nq question: a photo of green", "circle", None),
               Prompt("Question: What? Short answer:", "blue square", other_image)]
    batch = b.prepare(prompts)
    assert batch.pixel_values.shape[0] == 2
    assert batch.image_token_mask.sum(1).tolist() == [b.num_image_tokens, 0, b.num_image_tokens]
    with torch.no_grad():
        joint = b.target_logits(batch, b.forward(batch).logits)
        alone = torch.cat([b.target_logits(one, b.forward(one).logits)
                           for one in (b.prepare([p]) for p in prompts)])
    torch.testing.assert_close(joint, alone, atol=1e-5, rtol=1e-4)


def test_embed_puts_image_features_at_image_tokens(random_tiny, image):
    b = random_tiny
    batch = b.prepare([Prompt("Question: x Short answer:", "red", image)])
    with torch.no_grad():
        embeds = b.embed(batch)
        features = b.image_features(batch.pixel_values)[0]
    torch.testing.assert_close(embeds[0][batch.image_token_mask[0]], features)


def test_image_changes_the_prediction(random_tiny, image, other_image):
    b = random_tiny
    with torch.no_grad():
        a = b.forward(b.prepare([Prompt("Question: x Short answer:", "red", image)])).logits
        c = b.forward(b.prepare([Prompt("Question: x Short answer:", "red", other_image)])).logits
    assert not torch.allclose(a, c)


def test_hidden_states_for_every_layer(random_tiny, image):
    b = random_tiny
    out = b.forward(b.prepare([Prompt("Question: x Short answer:", "red", image)]),
                    output_hidden_states=True)
    assert len(out.hidden_states) == b.modules.num_language_layers + 1


def test_modules_by_role(random_tiny):
    m = random_tiny.modules
    assert m.ffn_in(-1) is m.by_role("ffn_in", -1)
    assert m.ffn_out(0).in_features == m.ffn_in(0).out_features
    assert m.projector().out_features == m.ffn_in(0).in_features
    assert m.vision_tower() is random_tiny.model.vision_model
    with pytest.raises(ValueError, match="unknown module role"):
        m.by_role("mlp", 0)
    with pytest.raises(IndexError):
        m.by_role("ffn_in", 99)


def test_generate_returns_text(random_tiny, image):
    out = random_tiny.generate([Prompt("Question: x Short answer:", "", image),
                                Prompt("nq question: y", "", None)], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_save_and_load_roundtrip_through_the_real_loader(random_tiny, image, tmp_path: Path):
    save_blip2(random_tiny, tmp_path)
    loaded = load_blip2(str(tmp_path), dtype="float32", device="cpu")
    prompt = [Prompt("Question: x Short answer:", "red", image)]
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward(loaded.prepare(prompt)).logits,
                                   random_tiny.forward(random_tiny.prepare(prompt)).logits)


@pytest.mark.parametrize("path, needle", [(None, "backbone.path is not set"),
                                          ("/nonexistent/blip2", "no weights at backbone.path")])
def test_missing_weights_say_which_setting(path, needle):
    with pytest.raises(WeightsNotFoundError, match=needle):
        load_blip2(path)


def test_folder_without_config_is_reported(tmp_path: Path):
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        load_blip2(str(tmp_path))
