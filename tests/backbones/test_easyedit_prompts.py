"""The prompt settings that make real BLIP-2 and MiniGPT-4 numbers comparable with EasyEdit's.

EasyEdit (the code all three papers used) tokenises BLIP-2's text without OPT's BOS
(``add_special_tokens=False`` in its forward) and feeds MiniGPT-4 ``###Human: <Img><ImageHere></Img>
{prompt}`` with no assistant marker, bare text-only prompts and no BOS. The real families' YAMLs
default to that; the adapters' Python defaults stay the families' own (the tiny models were
pretrained with them).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from PIL import Image

from mmke.backbones.blip2 import Blip2Backbone
from mmke.backbones.minigpt4 import MiniGPT4Backbone
from mmke.data.record import LazyImage, Prompt
from tests.backbones.families import build

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"


def _image(tmp_path: Path) -> LazyImage:
    path = tmp_path / "x.png"
    Image.new("RGB", (48, 48), (10, 200, 10)).save(path)
    return LazyImage(path)


def test_blip2_bos_token_setting(tmp_path):
    own = build("blip2")
    assert isinstance(own, Blip2Backbone)
    easyedit = Blip2Backbone(own.model, own.tokenizer, own.image_processor, bos_token=False)
    prompt = Prompt("Question: what? Short answer:", "red", _image(tmp_path))
    with_bos, without = own.encode(prompt).input_ids, easyedit.encode(prompt).input_ids
    queries = own.num_image_tokens
    assert with_bos[queries] == own.tokenizer.bos_token_id
    assert without == with_bos[:queries] + with_bos[queries + 1:]  # only the BOS is gone
    text_only = Prompt("nq question: where?", "here", None)
    assert easyedit.encode(text_only).input_ids == own.encode(text_only).input_ids[1:]


def test_minigpt4_easyedit_prompt(tmp_path):
    own = build("minigpt4")
    assert isinstance(own, MiniGPT4Backbone)
    easyedit = MiniGPT4Backbone(own.model, own.tokenizer, own.image_processor,
                                text_prompt_format="{}", assistant_marker="", bos_token=False)
    tok = own.tokenizer
    text_only = Prompt("nq question: where?", "here", None)
    ids = easyedit.encode(text_only, with_target=False).input_ids
    assert tok.decode(ids) == "nq question: where?"
    image_ids = easyedit.encode(Prompt("what?", "red", _image(tmp_path)), with_target=False).input_ids
    assert image_ids[0] != tok.bos_token_id
    text = tok.decode([i for i in image_ids if i >= 0])
    assert text.startswith("###Human: <Img>") and "Assistant" not in text
    assert own.encode(text_only, with_target=False).input_ids[0] == tok.bos_token_id


def test_real_family_configs_default_to_easyedit():
    blip2 = yaml.safe_load((CONF / "blip2.yaml").read_text())
    assert blip2["bos_token"] is False
    minigpt4 = yaml.safe_load((CONF / "minigpt4.yaml").read_text())
    assert (minigpt4["prompt_format"], minigpt4["text_prompt_format"],
            minigpt4["assistant_marker"], minigpt4["bos_token"]) == (
        "###Human: <Img><ImageHere></Img> {}", "{}", "", False)
