"""The same seed gives the same results; the runner's summary is the one written to disk."""

import json

from mmke.runner import run
from tests.conftest import compose_config

METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "n_edits", "n_failed")


def test_same_seed_gives_identical_summaries(tmp_path, pretrained):
    cfg = compose_config(["n_edits=4", "seed=7"])
    a = run(cfg, tmp_path / "a")
    b = run(cfg, tmp_path / "b")
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
    rows_a = (tmp_path / "a" / "edits.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "b" / "edits.jsonl").read_text().splitlines()
    # times (*_s) and memory (*_mb) are costs, measured, not results
    strip = lambda line: {k: v for k, v in json.loads(line).items()
                          if not k.endswith(("_s", "_mb"))}
    assert [strip(r) for r in rows_a] == [strip(r) for r in rows_b]
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {k: on_disk[k] for k in METRICS} == {k: a[k] for k in METRICS}
