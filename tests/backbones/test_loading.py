"""Real loading code paths of LLaVA and MiniGPT-4, exercised on tiny checkpoints written to disk
in the released layouts (weights cannot be downloaded here)."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from mmke.backbones.blip2 import save_blip2
from mmke.backbones.llava import load_llava, save_llava
from mmke.backbones.minigpt4 import load_minigpt4
from mmke.data.prompts import VQA_TEMPLATE
from mmke.data.record import LazyImage, Prompt
from mmke.errors import WeightsNotFoundError
from tests.backbones.families import build


@pytest.fixture(scope="module")
def prompts(world_dir) -> list[Prompt]:
    image = LazyImage(world_dir / "images" / "eval" / "s00000.png")
    return [Prompt(VQA_TEMPLATE.format("What colour is the square?"), "red", image),
            Prompt("nq question: a photo of", "green", None)]


def logits(backbone, prompts) -> torch.Tensor:
    with torch.no_grad():
        return backbone.forward(backbone.prepare(prompts)).logits


def test_llava_round_trip_through_the_llava_hf_layout(tmp_path, prompts):
    original = build("llava")
    save_llava(original, tmp_path)
    loaded = load_llava(str(tmp_path), prompt_format=original.prompt_format)
    assert torch.equal(logits(original, prompts), logits(loaded, prompts))


@pytest.fixture(scope="module")
def minigpt4_sources(tmp_path_factory):
    """A BLIP-2 checkpoint in HF layout, a Vicuna stand-in in HF layout, and a synthetic
    MiniGPT-4 checkpoint file with the released key names (plus keys MiniGPT-4 ignores)."""
    root = tmp_path_factory.mktemp("minigpt4")
    blip2, reference = build("blip2"), build("minigpt4")
    save_blip2(blip2, root / "blip2")
    reference.model.language_model.save_pretrained(root / "vicuna")
    reference.tokenizer.save_pretrained(root / "vicuna")
    proj = reference.model.llama_proj
    state = {"llama_proj.weight": torch.randn_like(proj.weight),
             "llama_proj.bias": torch.randn_like(proj.bias)}
    torch.save({"model": {**state, "llama_model.lm_head.weight": torch.zeros(2, 2)}, "epoch": 3},
               root / "pretrained_minigpt4.pth")
    save_file(state, str(root / "pretrained_minigpt4.safetensors"))
    return root, blip2, reference, state


@pytest.mark.parametrize("checkpoint", ["pretrained_minigpt4.pth", "pretrained_minigpt4.safetensors"])
def test_minigpt4_assembles_from_its_three_sources(minigpt4_sources, checkpoint, prompts):
    root, blip2, reference, state = minigpt4_sources
    loaded = load_minigpt4(str(root / "blip2"), str(root / checkpoint), str(root / "vicuna"))
    model = loaded.model
    assert torch.equal(model.llama_proj.weight, state["llama_proj.weight"])
    assert torch.equal(model.llama_proj.bias, state["llama_proj.bias"])
    for mine, theirs in ((model.vision_model, blip2.model.vision_model),
                         (model.qformer, blip2.model.qformer)):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(model.query_tokens, blip2.model.query_tokens)
    for (name, a), (_, b) in zip(model.language_model.state_dict().items(),
                                 reference.model.language_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert logits(loaded, prompts).isfinite().all()
    assert loaded.num_image_tokens == blip2.num_image_tokens


def test_minigpt4_checkpoint_without_projection_keys_is_named(minigpt4_sources):
    root = minigpt4_sources[0]
    torch.save({"model": {"something.else": torch.zeros(1)}}, root / "wrong.pth")
    with pytest.raises(WeightsNotFoundError, match="llama_proj.weight"):
        load_minigpt4(str(root / "blip2"), str(root / "wrong.pth"), str(root / "vicuna"))


def test_minigpt4_checkpoint_is_read_without_unpickling_code(minigpt4_sources):
    """``weights_only=True``: a checkpoint that would run code on load is refused."""
    root = minigpt4_sources[0]
    with open(root / "unsafe.pth", "wb") as f:
        pickle.dump({"model": {"llama_proj.weight": print}}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_minigpt4(str(root / "blip2"), str(root / "unsafe.pth"), str(root / "vicuna"))


def test_minigpt4_missing_vicuna_is_named(minigpt4_sources):
    root = minigpt4_sources[0]
    with pytest.raises(WeightsNotFoundError, match="backbone.llama_path"):
        load_minigpt4(str(root / "blip2"), str(root / "pretrained_minigpt4.pth"), str(root / "nowhere"))
