"""Shared fixtures: the composed default config, the cached tiny backbone, a random tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mmke.backbones.blip2 import Blip2Backbone
from mmke.backbones.tiny.blip2 import TinyBlip2Spec, tiny_blip2_model
from mmke.backbones.tiny.tokenizer import IMAGE, train_tokenizer
from mmke.data.miniworld.generate import MiniWorldSpec, ensure_miniworld
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def cache_dir() -> Path:
    """The same cache the CLI uses, so tests and `make demo` build the tiny world/model once."""
    return Path(os.environ.get("MMKE_CACHE_DIR", ROOT / ".cache" / "mmke")).resolve()


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config",
                       overrides=[f"paths.cache_dir={cache_dir()}", "progress=false",
                                  *(overrides or [])])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: the models are too small to gain from
    a second intra-op thread, and on a busy 2-core machine a second one spin-waits (one FT edit
    then takes a minute instead of half a second). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def default_cfg():
    return compose_config()


@pytest.fixture(scope="session")
def world_dir(default_cfg) -> Path:
    return ensure_miniworld(cache_dir(), MiniWorldSpec(**default_cfg.world))


#: The small mini world's settings (``world.*``): 300 train scenes instead of 1500.
SMALL_WORLD = {"train_scenes": 300, "eval_scenes": 40, "loc_scenes": 10, "fact_subjects": 3,
               "probes_per_category": 1}

#: The marks of a test on the default (shipped) build of tiny LLaVA, MiniGPT-4 or Qwen2-VL:
#: `make test-families` runs these alone (`make test` and CI run them with the rest).
FULL_BUILD = [pytest.mark.slow, pytest.mark.families]

#: Each family's short build on the small world (few steps): the real recipe end to end in
#: seconds, for tests of the recipe and of the command line (``SMALL_WORLD`` added as ``world.*``).
_SHORT = ["backbone.stage1.steps=10", "backbone.pretraining.epochs=1"]
SHORT_BUILD = {"tiny_blip2": _SHORT, "tiny_llava": _SHORT, "tiny_qwen2vl": _SHORT,
               "tiny_minigpt4": ["backbone.blip2.stage1.steps=10", "backbone.blip2.pretraining.epochs=1",
                                 "backbone.pretraining.epochs=1"]}


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A small mini world for stage-1 tests and short builds, generated once per session into a
    cache folder of its own (``small_world.parents[1]``)."""
    return ensure_miniworld(tmp_path_factory.mktemp("small_world"), MiniWorldSpec(**SMALL_WORLD))


@pytest.fixture(scope="session")
def vqa_source(default_cfg):
    return instantiate(default_cfg.data)


@pytest.fixture(scope="session")
def pretrained(default_cfg) -> Blip2Backbone:
    """The default tiny BLIP-2, pretrained on the mini world (built once, then cached on disk)."""
    return instantiate(default_cfg.backbone)


@pytest.fixture(scope="session")
def random_tiny(world_dir) -> Blip2Backbone:
    """An untrained tiny BLIP-2 with a real tokenizer: for contract tests that need no knowledge."""
    import torch

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["Question: What colour is the square? Short answer: red blue",
                                 "nq question: a photo of green circle"], 300)
    spec = TinyBlip2Spec(vocab_size=300, text_layers=3, num_query_tokens=4)
    model = tiny_blip2_model(spec, 48, tokenizer.convert_tokens_to_ids(IMAGE),
                             tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return Blip2Backbone(model, tokenizer, BlipImageProcessorPil(size={"height": 48, "width": 48}),
                         name="random_tiny")
