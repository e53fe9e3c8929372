"""Cost per edit: peak and incremental memory in every row, and their aggregates in the summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mmke.editors.ft import FineTune
from mmke.evaluation.evaluator import Evaluator
from mmke.evaluation.spec import MetricSpec
from mmke.protocols.sequential import Sequential
from mmke.protocols.single import SingleEdit
from mmke.summary import summarize
from tests.conftest import ROOT

MEMORY = ("peak_mem_mb", "incremental_mem_mb")

# A fresh process, so that its high-water mark is not already above what the edit allocates.
GROWING_EDITS = """
import json, torch
from mmke.cost import MemoryMeter
meter, kept, out = MemoryMeter(torch.device("cpu")), [], []
for _ in range(3):
    meter.start()
    kept.append(torch.ones(32 * 1024 * 1024))  # an editor that keeps 128 MiB per edit
    m = meter.stop()
    out.append([m.peak_mem_mb, m.incremental_mem_mb])
print(json.dumps(out))
"""


def test_memory_meter_sees_memory_grow_with_each_edit() -> None:
    proc = subprocess.run([sys.executable, "-c", GROWING_EDITS], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    readings = json.loads(proc.stdout.splitlines()[-1])
    increments = [inc for _, inc in readings]
    for k, inc in enumerate(increments, start=1):
        assert 128 * k - 8 <= inc <= 128 * k + 64, increments  # k x 128 MiB kept so far
    assert all(peak > inc for peak, inc in readings)  # the baseline (the model) is not zero


def check_rows(rows: list[dict]) -> None:
    for row in rows:
        for key in MEMORY:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
        assert row["peak_mem_mb"] > 0
        assert row["edit_s"] > 0 and row["eval_s"] > 0 and row["steps"] >= 1
    # every increment is over the same baseline: the memory in use before the first edit
    baselines = [r["peak_mem_mb"] - r["incremental_mem_mb"] for r in rows]
    assert baselines[0] > 0 and baselines == pytest.approx([baselines[0]] * len(rows))


@pytest.mark.parametrize("protocol", [SingleEdit(), Sequential(T=2)], ids=["single", "sequential"])
def test_every_edit_row_has_its_memory(protocol, pretrained, vqa_source) -> None:
    editor = FineTune(steps=3)
    editor.attach(pretrained, vqa_source.templates)
    evaluator = Evaluator(MetricSpec(), vqa_source.templates)
    rows = protocol.run(editor, evaluator, vqa_source.records("eval", limit=4), lambda r: None,
                        progress=False)
    check_rows(rows)
    cost = summarize(rows, 1.0, evaluator.forwards)["cost"]
    assert cost["peak_mem_mb"] == max(r["peak_mem_mb"] for r in rows)
    assert cost["incremental_mem_mb"] == max(r["incremental_mem_mb"] for r in rows)
    assert cost["incremental_mem_mb_mean"] == pytest.approx(
        sum(r["incremental_mem_mb"] for r in rows) / len(rows))
    assert cost["peak_mem_mb"] > 0 and cost["edit_s"] > 0
    assert all(math.isfinite(cost[k]) for k in ("incremental_mem_mb", "incremental_mem_mb_mean"))
