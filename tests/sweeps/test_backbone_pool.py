"""Backbone reuse: loaded once per process, verified before each reuse, reloaded on any change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmke.sweep.fingerprint import hook_count, model_fingerprint, tensor_fingerprint
from mmke.sweep.pool import BackbonePool
from tests.conftest import compose_config


@pytest.mark.parametrize("dtype, bits", [
    (torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float16, torch.int16),
    (torch.float64, torch.int64)])
def test_one_ulp_in_one_element_changes_the_fingerprint(dtype, bits) -> None:
    torch.manual_seed(0)
    t = torch.randn(1000, dtype=dtype)
    before = tensor_fingerprint(t)
    assert tensor_fingerprint(t.clone()) == before
    t.view(bits)[417] += 1  # the next representable value: one ulp
    assert tensor_fingerprint(t) != before


def test_swapping_two_elements_changes_the_fingerprint() -> None:
    t = torch.arange(10, dtype=torch.float32)
    before = tensor_fingerprint(t)
    t[[2, 7]] = t[[7, 2]]
    assert tensor_fingerprint(t) != before  # the plain sum alone would not see it


def test_fingerprint_covers_grad_flags_mode_and_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    base = model_fingerprint(model)
    model[0].weight.requires_grad_(False)
    assert model_fingerprint(model) != base
    model[0].weight.requires_grad_(True)
    model.train(not model.training)
    assert model_fingerprint(model) != base
    model.train(not model.training)
    handle = model[1].register_forward_hook(lambda *args: None)
    assert model_fingerprint(model) != base
    handle.remove()
    assert model_fingerprint(model) == base


@pytest.fixture
def backbone_cfg(pretrained):  # pretrained: the tiny backbone is built and cached on disk
    return compose_config().backbone


def test_pool_loads_once_and_reuses(backbone_cfg) -> None:
    pool = BackbonePool()
    first, reused = pool.get(backbone_cfg)
    assert not reused and pool.loads == 1
    second, reused = pool.get(backbone_cfg)
    assert reused and second is first and pool.loads == 1


def test_pool_reloads_a_changed_backbone(backbone_cfg) -> None:
    pool = BackbonePool()
    first, _ = pool.get(backbone_cfg)
    original = {k: v.clone() for k, v in first.model.state_dict().items()}
    with torch.no_grad():  # an edit that restore() did not undo
        first.modules.ffn_out(-1).weight[0, 0] += 1e-3
    second, reused = pool.get(backbone_cfg)
    assert not reused and second is not first and pool.loads == 2
    assert all(second.model.state_dict()[k].equal(v) for k, v in original.items())


def test_pool_keys_by_config_and_device(backbone_cfg) -> None:
    pool = BackbonePool()
    first, _ = pool.get(backbone_cfg)
    other, reused = pool.get(backbone_cfg, {"device": "cpu"})  # another device slot
    assert not reused and other is not first and pool.loads == 2
    again, reused = pool.get(backbone_cfg)  # the first slot still holds the first backbone
    assert reused and again is first
    renamed = backbone_cfg.copy()
    renamed.name = "tiny_again"
    third, reused = pool.get(renamed)  # another config on the same slot evicts it
    assert not reused and third.name == "tiny_again" and pool.loads == 3


def test_the_output_recorders_transformers_installs_are_not_a_leftover(pretrained) -> None:
    """The first forward asking for hidden states (ODEdit, ASAM) makes transformers put its
    output-recording hooks on every layer for good; a reused backbone is still the one loaded."""
    import copy

    from mmke.data.record import Prompt

    backbone = copy.deepcopy(pretrained)
    batch = backbone.build_batch([Prompt("nq question: what is the capital of x", "y")])
    backbone.forward(batch)
    base = model_fingerprint(backbone.model)
    backbone.forward(batch, output_hidden_states=True)
    hooks = sum(len(m._forward_hooks) for m in backbone.model.modules())
    assert hook_count(backbone.model) == 0 < hooks  # they are there, and are not counted
    assert model_fingerprint(backbone.model) == base
    handle = backbone.modules.ffn_out(0).register_forward_hook(lambda *args: None)
    assert model_fingerprint(backbone.model) != base  # an editor's hook still counts
    handle.remove()
