"""The tiny recipes' in-context stage (``mmke.backbones.tiny.context``), cut to a few steps: its
sequences are IKE's format from the train split, its build is cached beside the base build and
keyed by its settings, and the model it leaves reads 512 positions."""

import random

from mmke.backbones.tiny.blip2 import tiny_blip2, tiny_blip2_folder
from mmke.backbones.tiny.builder import read_report
from mmke.backbones.tiny.context import _tasks, context_example
from mmke.data.demonstrations import IKEFormat
from tests.conftest import cache_dir

SHORT = {"enabled": True, "steps": 12, "warmup_steps": 4, "batch_size": 4}


def test_sequences_follow_the_fact_or_keep_the_answer(world_dir):
    fmt = IKEFormat()
    tasks = _tasks(world_dir, fmt)
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        task = rng.choice(tasks)
        index = rng.randrange(len(task.records))
        demos, prompt = context_example(task, index, 3, rng, fmt)
        r = task.records[index]
        fact = fmt.fact(task.templates.edit.format(r.src), r.alt)
        assert prompt.text.startswith(f"New Fact: {fact}\nPrompt: ")
        assert demos[-1] == fmt.demonstration(fact, task.templates.edit.format(r.src), r.alt)
        assert len(demos) <= 4 and all(d.endswith(fmt.separator) for d in demos)
        follows = prompt.kind in ("rel", "t_gen", "m_gen")
        assert prompt.target == (r.alt if follows else (r.loc_ans if prompt.kind == "t_loc"
                                                       else r.m_loc_a))
        seen.add(prompt.kind)
    assert seen == {"rel", "t_gen", "m_gen", "t_loc", "m_loc"}


def test_the_stage_is_a_cached_build_beside_the_base(pretrained):
    cache = str(cache_dir())
    backbone = tiny_blip2(cache, in_context=SHORT, progress=False)
    assert backbone.context_length == 512
    base = tiny_blip2_folder(cache, progress=False)
    built = [p for p in base.parent.iterdir() if p.name.startswith(base.name + "-context-")]
    folder = next(p for p in built if read_report(p).get("context_steps") == SHORT["steps"])
    report = read_report(folder)
    assert report["base_vqa_orig"] == read_report(base)["vqa_orig"]
    assert {"vqa_orig", "caption_m_loc", "context_final_loss"} <= report.keys()
    marker = (folder / "pretrain_report.json").stat().st_mtime_ns
    tiny_blip2(cache, in_context=SHORT, progress=False)  # found, not trained again
    assert (folder / "pretrain_report.json").stat().st_mtime_ns == marker
    assert tiny_blip2(cache, progress=False).context_length == 128  # off: the base build
