"""MEND's fit on a tiny backbone and its eval-split edits (issue 13). Prints; asserts nothing.

    python benchmarks/mend_fit.py [--backbone tiny_blip2] [--data mini_vqa] [--edits 100]
                                  [--stream 100] [--cache]

Fits MEND with the settings ``editor=mend backbone=<backbone>`` composes (the default tiny
settings, conf/editor_backbone/mend_<backbone>.yaml) in a fresh temporary cache, so the fit
really runs (``--cache``: use paths.cache_dir, where a second run only loads), and prints the fit
time. Then ``--edits`` single edits of eval records, scored by the real evaluator (Rel, T-Gen,
M-Gen, T-Loc, M-Loc, percent), beside the unedited model's scores of the same records; and the
same records as one online stream of ``--stream`` edits (M-ORE's protocol, eval=more metrics),
where the edits pile up on the weights: the per-step means over the first 1, 10 and 100 edits (M-ORE
Table 1's MEND_1, MEND_10, MEND_100), Rel per block of 10, and every edit rescored at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import mean_row  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from benchmarks.spine import cache_dir  # noqa: E402
from mmke.config import build  # noqa: E402
from mmke.editors.base import NoEdit  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from mmke.protocols.online import Online  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="tiny_blip2")
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--stream", type=int, default=100)
    parser.add_argument("--cache", action="store_true", help="fit into paths.cache_dir")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"paths.cache_dir={cache_dir()}", "progress=false", "editor=mend",
            f"backbone={args.backbone}", f"data={args.data}"])
    backbone, source = instantiate(cfg.backbone), instantiate(cfg.data)
    train = source.records("train")
    with tempfile.TemporaryDirectory() as tmp:
        # reg=none built as the runner builds it, so --cache shares the key of `python run.py`
        editor = build(cfg.editor, regularizer=build(cfg.reg),
                       **({} if args.cache else {"cache_dir": tmp}))
        editor.attach(backbone, source.templates, train_records=lambda: train)
        print(f"torch threads {torch.get_num_threads()}; training {editor.training}", flush=True)
        start = time.perf_counter()
        report = editor.fit(train)
        fit_s = time.perf_counter() - start
    how = "trained" if report.trained_now else "loaded from the cache"
    per_step = f" ({fit_s / report.steps_run * 1000:.0f} ms/step)" if report.steps_run else ""
    print(f"fit: {how}, {report.steps_run} steps on {len(train)} train records in {fit_s:.1f} s"
          f"{per_step}; last losses "
          + ", ".join(f"{k} {v:.3g}" for k, v in report.last_losses.items()))
    print("edit rates α: " + ", ".join(f"{label} {float(a):.2e}" for (label, _), a
                                        in zip(editor.edited(), editor.networks.edit_lrs.detach())))
    records = source.records("eval", limit=args.edits)
    evaluator = Evaluator(MetricSpec(), source.templates)
    unedited = NoEdit()
    unedited.attach(backbone, source.templates)
    base = SingleEdit().run(unedited, evaluator, records, sink=lambda row: None, progress=False)
    start = time.perf_counter()
    single = SingleEdit().run(editor, evaluator, records, sink=lambda row: None, progress=False)
    per_edit = (time.perf_counter() - start) / len(records)
    print(f"{len(records)} single edits of eval records ({per_edit * 1000:.0f} ms per edit "
          "with its evaluation):")
    print(f"  unedited  {mean_row(base)}")
    print(f"  MEND      {mean_row(single)}")
    if args.stream:
        stream = records[:args.stream]
        online = Evaluator(MetricSpec(locality="kl", loc_positions="first"), source.templates)
        rows = Online(T=len(stream)).run(editor, online, stream, sink=lambda row: None,
                                         progress=False)
        marks = [n for n in (1, 10, 100) if n <= len(rows)]
        print(f"one online stream of {len(stream)} edits (eval=more metrics, per step):")
        for n in marks:
            print(f"  after {n:3d} edits: {mean_row(rows[:n])}  "
                  f"(edit {n}: rel {rows[n - 1]['rel']:5.1f})")
        blocks = [rows[i:i + 10] for i in range(0, len(rows), 10)]
        print("  Rel of each block of 10 edits, per step: "
              + " ".join(f"{sum(r['rel'] or 0.0 for r in b) / len(b):.0f}" for b in blocks))
        print(f"  end of stream, all {len(rows)}: {mean_row(rows, suffix='_final')}")


if __name__ == "__main__":
    main()
