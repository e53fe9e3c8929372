"""The trained-editor machinery (mmke.editors.training) on a small real method: a learned bias
over the vocabulary added to the tiny BLIP-2's logits, trained on the train split's edits.
Cache, resume after a kill, frozen backbone, deterministic batches, clear failures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file
from torch import nn

from mmke.backbones.base import ForwardOutput, ModelBatch
from mmke.config import build
from mmke.data.prompts import PromptTemplates, edit_prompts
from mmke.data.record import EditRecord
from mmke.editors.base import EditOutcome
from mmke.editors.training import (
    CHECKPOINT, FINAL, TrainedEditor, TrainingError, TrainingSettings, batch_indices)
from mmke.errors import ConfigError
from mmke.runner import run
from tests.conftest import compose_config
from tests.editors.conftest import state
from tests.test_distributed import THREADS, launch, launch_module, single

pytestmark = pytest.mark.usefixtures("one_thread")


class LogitBias(TrainedEditor):
    """Adds a trained bias to the logits: enough to exercise training, caching and resume."""

    def __init__(self, scale: float = 1.0, fail_at: int | None = None,
                 blow_up_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale, self.fail_at, self.blow_up_at = scale, fail_at, blow_up_at
        self.steps_seen: list[int] = []
        self.batches: list[list[str]] = []

    def build_networks(self, train_records: Sequence[EditRecord]) -> nn.Module:
        assert self.backbone is not None
        vocab = self.backbone.model.get_output_embeddings().weight.shape[0]
        net = nn.Module()
        net.bias = nn.Parameter(torch.randn(vocab) * 0.01)
        return net

    def training_loss(self, batch: Sequence[EditRecord], step: int
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        if step == self.fail_at:
            raise KeyboardInterrupt  # the process is killed mid-training
        self.steps_seen.append(step)
        self.batches.append([r.uid for r in batch])
        prompts = [edit_prompts(r, self.templates)[0] for r in batch]
        model_batch = self.backbone.prepare(prompts)
        # a mean over records (of per-record means): two processes' halves average to the same
        loss = self.backbone.nll(model_batch, self.forward(model_batch), reduction="none").mean()
        if step == self.blow_up_at:
            loss = loss * float("nan")
        return loss, {"nll": loss.item()}

    def cache_settings(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def forward(self, batch: ModelBatch, output_hidden_states: bool = False) -> ForwardOutput:
        out = self.backbone.forward(batch, output_hidden_states=output_hidden_states)
        return ForwardOutput(out.logits + self.scale * self.networks.bias, out.hidden_states)

    def _apply(self, records: Sequence[EditRecord]) -> EditOutcome:
        return EditOutcome()

    def restore(self) -> None:
        return None


def make(backbone, cache, steps: int = 6, **kwargs: Any) -> LogitBias:
    training = {"steps": steps, "batch_size": 4, "lr": 0.05, "checkpoint_every": 2,
                **kwargs.pop("training", {})}
    editor = LogitBias(training=training, cache_dir=str(cache), progress=False, **kwargs)
    editor.attach(backbone, PromptTemplates())
    return editor


@pytest.fixture(scope="module")
def records(train) -> list[EditRecord]:
    return list(train[:40])


def test_fit_trains_then_a_second_editor_loads_it(pretrained, records, tmp_path):
    pretrained.model.zero_grad(set_to_none=True)  # earlier tests of the session may leave some
    before = state(pretrained.model)
    first = make(pretrained, tmp_path)
    report = first.fit(records)
    assert report.trained_now and report.steps_run == 6 and report.resumed_from == 0
    assert first.steps_seen == list(range(6))
    assert report.last_losses["nll"] < 20
    folder = tmp_path / "trained" / first.name / report.key
    assert (folder / FINAL).is_file() and not (folder / CHECKPOINT).exists()
    # the backbone is neither changed nor left with gradients, and its flags are back
    after = state(pretrained.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in pretrained.model.parameters())
    second = make(pretrained, tmp_path)
    again = second.fit(records)
    assert not again.trained_now and again.steps_run == 0 and second.steps_seen == []
    assert again.key == report.key
    assert torch.equal(second.networks.bias, first.networks.bias)


def test_a_changed_setting_trains_again(pretrained, records, tmp_path):
    keys = set()
    for kwargs in ({}, {"scale": 2.0}, {"training": {"lr": 0.01}}):
        editor = make(pretrained, tmp_path, steps=2, **kwargs)
        report = editor.fit(records)
        assert report.trained_now
        keys.add(report.key)
    assert len(keys) == 3
    assert make(pretrained, tmp_path, steps=2).fit(records[:39]).trained_now  # other records


def test_a_killed_fit_resumes_from_its_checkpoint_with_the_same_result(pretrained, records,
                                                                       tmp_path):
    cut = {"training": {"lr_cuts": [2]}}  # the resumed steps run at the cut rate
    whole = make(pretrained, tmp_path / "whole", steps=7, **cut)
    whole.fit(records)
    killed = make(pretrained, tmp_path / "killed", steps=7, fail_at=5, **cut)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(records)
    assert killed.steps_seen == [0, 1, 2, 3, 4]
    resumed = make(pretrained, tmp_path / "killed", steps=7, **cut)
    report = resumed.fit(records)
    assert report.trained_now and report.resumed_from == 4 and report.steps_run == 3
    assert resumed.steps_seen == [4, 5, 6]
    assert resumed.batches == whole.batches[4:]
    # Adam's moments and the RNG came back too: bit-identical to the uninterrupted fit
    assert torch.equal(resumed.networks.bias, whole.networks.bias)


def test_a_non_finite_loss_stops_with_the_step_and_what_to_do(pretrained, records, tmp_path):
    flags = [p.requires_grad for p in pretrained.model.parameters()]
    editor = make(pretrained, tmp_path, steps=4, blow_up_at=3)
    with pytest.raises(TrainingError, match="step 3.*editor.training.lr"):
        editor.fit(records)
    assert [p.requires_grad for p in pretrained.model.parameters()] == flags
    assert not list((tmp_path / "trained").glob(f"*/*/{FINAL}"))


def test_batches_are_seeded_epochs_independent_of_earlier_steps():
    n, size = 10, 4
    steps = [batch_indices(n, size, s, seed=3) for s in range(5)]
    flat = [i for b in steps for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert batch_indices(n, size, 3, seed=3) == steps[3]
    assert batch_indices(n, size, 0, seed=4) != steps[0]


def test_the_learning_rate_is_cut_after_each_cut_step():
    settings = TrainingSettings(lr_cuts=[10, 20], lr_cut_rate=0.1)
    assert [settings.lr_factor(s) for s in (0, 10, 11, 20, 21)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_bad_settings_are_config_errors(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="editor.training.steps"):
        TrainingSettings(steps=0)
    with pytest.raises(ConfigError, match="unknown setting.*'epochs'"):
        TrainingSettings.of({"epochs": 3})
    editor = LogitBias(training={"steps": 1}, cache_dir=None, progress=False)
    editor.attach(pretrained, PromptTemplates())
    with pytest.raises(ConfigError, match="editor.cache_dir"):
        editor.fit([object()])  # type: ignore[list-item]


TOY = "tests.editors.test_training.LogitBias"
TOY_TRAINING = "{steps:4,batch_size:4,lr:0.05,checkpoint_every:2}"


def toy_cfg(cache, **settings: Any):
    cfg = compose_config(["editor=none", "n_edits=2", "cpu_threads=1"])
    with open_dict(cfg):
        cfg.editor = OmegaConf.create({"_target_": TOY, "name": "logitbias",
                                       "cache_dir": str(cache), "progress": False,
                                       "training": {"steps": 3, "batch_size": 4}})
        cfg.update(settings)
    return cfg


def test_train_only_fits_and_edits_nothing_then_a_run_loads_the_fit(tmp_path):
    trained = run(toy_cfg(tmp_path / "cache", train_only=True), tmp_path / "fit")
    assert trained == {"fit": trained["fit"]} and trained["fit"]["trained_now"]
    assert not (tmp_path / "fit").exists()  # no run folder: nothing was edited or scored
    summary = run(toy_cfg(tmp_path / "cache"), tmp_path / "run")
    assert summary["fit"]["trained_now"] is False and summary["fit"]["steps_run"] == 0
    assert summary["fit"]["key"] == trained["fit"]["key"]
    assert summary["n_edits"] == 2


def test_train_only_for_an_editor_without_training_is_a_config_error(tmp_path):
    cfg = compose_config(["editor=ft", "n_edits=1", "train_only=true"])
    with pytest.raises(ConfigError, match="train_only=true: editor=ft has nothing to train"):
        run(cfg, tmp_path / "run")


def test_two_processes_train_data_parallel_to_the_networks_of_one(tmp_path, pretrained):
    """Each process takes half of every batch; averaged gradients give one process's step."""
    common = ("editor=none", f"editor._target_={TOY}", f"+editor.training={TOY_TRAINING}",
              "+editor.progress=false", "train_only=true", THREADS)
    ref = single(*common, f"+editor.cache_dir={tmp_path / 'one'}", f"hydra.run.dir={tmp_path}/r1")
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = launch(2, *common, f"+editor.cache_dir={tmp_path / 'two'}",
                  f"hydra.run.dir={tmp_path}/r2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("editor=none: trained 4 steps") == 1  # the main process reports
    one, two = (load_file(next((tmp_path / d).rglob(FINAL))) for d in ("one", "two"))
    assert torch.allclose(one["net.bias"], two["net.bias"], atol=1e-6)
    assert not torch.equal(one["net.bias"], torch.zeros_like(one["net.bias"]))


#: MEND, LiveEdit and SERAC as the tiny BLIP-2 composes them, a few steps over an odd batch (two
#: processes take 3 and 2 of its 5 records)
SHORT_FITS = ("editor.training.steps=3", "editor.training.batch_size=5", THREADS)
#: parameters whose gradient is rounding noise, which Adam scales to steps of any size: a key
#: bias shifts every score of a query alike, so softmax ignores it (LiveEdit's cross-attention,
#: the attention of SERAC's counterfactual model), and SERAC's classifier head bias cancels in
#: the distance f(x) - f(e)
NOISE_ONLY = (".k.bias", ".k_proj.bias", "classifier.head.bias")


def test_two_processes_fit_trained_editors_to_the_networks_of_one(tmp_path, pretrained,
                                                                  vqa_source, train):
    """Terms that couple a batch's records see the whole batch in every process: MEND's running
    statistics merge every process's moments; LiveEdit's experts and routing features and
    SERAC's edit embeddings (its classifier's pairs span the batch) are gathered with their
    gradients, and means are weighed by the shares. So two processes fit the networks one
    process fits (here in-process, from the same settings: the same cache key)."""
    names = ("mend", "liveedit", "serac")
    proc = launch_module(2, "tests.editors.fit_launched", ",".join(names), *SHORT_FITS,
                         f"editor.cache_dir={tmp_path / 'two'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in names:
        cfg = compose_config([f"editor={name}", *SHORT_FITS, f"editor.cache_dir={tmp_path}"])
        one = build(cfg.editor)
        one.attach(pretrained, vqa_source.templates, train_records=lambda: train)
        report = one.fit(train)
        assert f"{name}: {report.key} trained 3 steps" in proc.stdout
        two = load_file(tmp_path / "two" / "trained" / name / report.key / FINAL)
        expected = one.networks.state_dict()
        assert {f"net.{k}" for k in expected} == set(two)
        # every element, the statistics too (float64 sums of many rows). Adam lifts the rounding
        # noise of an element whose gradient is near zero to a step of up to lr, so a few stray
        # elements are noise (SERAC: about 20 of its 1.1M); an objective that differs moves
        # nearly all of them
        stray = {key: int((~torch.isclose(two[f"net.{key}"], value, rtol=1e-5, atol=2e-6)).sum())
                 for key, value in expected.items() if not key.endswith(NOISE_ONLY)}
        total = sum(expected[key].numel() for key in stray)
        assert sum(stray.values()) <= 1e-4 * total, \
            f"{name}: {sum(stray.values())} of {total} elements differ: " \
            f"{ {k: n for k, n in stray.items() if n} }"


class TiedBias(LogitBias):
    """Networks with one tensor under two names, as an LM head tied to its embedding."""

    def build_networks(self, train_records: Sequence[EditRecord]) -> nn.Module:
        net = super().build_networks(train_records)
        net.head = nn.Module()
        net.head.bias = net.bias
        return net


def test_tied_weights_are_written_and_read_back(pretrained, records, tmp_path):
    first = TiedBias(training={"steps": 2, "batch_size": 2}, cache_dir=str(tmp_path),
                     progress=False)
    first.attach(pretrained, PromptTemplates())
    assert first.fit(records).trained_now
    second = TiedBias(training={"steps": 2, "batch_size": 2}, cache_dir=str(tmp_path),
                      progress=False)
    second.attach(pretrained, PromptTemplates())
    assert not second.fit(records).trained_now
    assert torch.equal(second.networks.head.bias, first.networks.bias)
    assert second.networks.head.bias is second.networks.bias  # still one tensor


def test_reg_none_and_a_default_built_editor_share_one_fit(pretrained, records, tmp_path):
    from mmke.regularizers.base import NoRegularizer

    keys = []
    for regularizer in (None, NoRegularizer(name="none")):
        editor = LogitBias(training={"steps": 1, "batch_size": 2}, cache_dir=str(tmp_path),
                           progress=False, regularizer=regularizer)
        editor.attach(pretrained, PromptTemplates())
        keys.append(editor.training_key(records))
    assert keys[0] == keys[1]
