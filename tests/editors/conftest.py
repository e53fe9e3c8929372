"""Fixtures shared by the editor tests: the tiny family under test (tiny BLIP-2, and the
Llama-style tiny LLaVA under the ``families`` marker), its backbone, the mini world's train split,
and LiveEdit's short fit, made once per session."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from mmke.config import build
from mmke.editors.base import Editor
from mmke.editors.training import FitReport
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.single import SingleEdit
from tests.conftest import FULL_BUILD, compose_config

#: LiveEdit's short fit on the tiny BLIP-2 (under a minute): enough to learn routing, not to edit
#: well. Made once a session by the ``liveedit_fit`` fixture, loaded by every test that asks.
LIVEEDIT_FIT = {"steps": 200, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 100}

FAMILIES = [pytest.param("tiny_blip2"),
            pytest.param("tiny_llava", marks=FULL_BUILD)]


def composed(editor: str, family: str, **overrides) -> Editor:
    """The editor as ``python run.py editor=<editor> backbone=<family>`` builds it."""
    return build(compose_config([f"editor={editor}", f"backbone={family}"]).editor, **overrides)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def liveedit_fit(pretrained, vqa_source, tmp_path_factory) -> tuple[Path, FitReport]:
    """``LIVEEDIT_FIT`` made once into a cache of its own: the folder (editors built with
    ``cache_dir`` there load the fit) and the fit's report."""
    cache = tmp_path_factory.mktemp("liveedit_fit")
    editor = composed("liveedit", "tiny_blip2", training=LIVEEDIT_FIT, progress=False,
                      cache_dir=str(cache))
    editor.attach(pretrained, vqa_source.templates)
    pretrained.model.zero_grad(set_to_none=True)  # earlier tests of the session may leave some
    editor.fit(vqa_source.records("train"))
    assert editor.fit_report is not None
    return cache, editor.fit_report


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backbone(family):
    return instantiate(compose_config([f"backbone={family}"]).backbone)


@pytest.fixture(scope="module")
def train(vqa_source):
    return vqa_source.records("train")


def single_edit_rel(editor: Editor, source, n: int = 20) -> float:
    """Mean Rel. (percent) of ``n`` single edits of eval records, scored by the real evaluator."""
    records = source.records("eval", limit=n)
    evaluator = Evaluator(MetricSpec(), source.templates)
    rows = SingleEdit().run(editor, evaluator, records, sink=lambda row: None, progress=False)
    return sum(r["rel"] for r in rows) / len(rows)
