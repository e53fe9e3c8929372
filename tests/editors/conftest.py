"""Fixtures shared by the editor tests: the tiny family under test (tiny BLIP-2, and the
Llama-style tiny LLaVA under the ``families`` marker: its full build is not made in CI), its
backbone, and the mini world's train split."""

import pytest
import torch
from hydra.utils import instantiate

from mmke.config import build
from mmke.editors.base import Editor
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.single import SingleEdit
from tests.conftest import FULL_BUILD, compose_config

FAMILIES = [pytest.param("tiny_blip2"),
            pytest.param("tiny_llava", marks=FULL_BUILD)]


def composed(editor: str, family: str, **overrides) -> Editor:
    """The editor as ``python run.py editor=<editor> backbone=<family>`` builds it."""
    return build(compose_config([f"editor={editor}", f"backbone={family}"]).editor, **overrides)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
