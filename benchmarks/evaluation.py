"""Evaluation conventions and scoring modes on the tiny default (issue 9). Prints; asserts nothing.

    python benchmarks/evaluation.py [--records 50] [--data mini_vqa] [--backbone tiny_blip2]

1. Locality conventions: the same FT edits scored under every ``eval.loc_positions`` convention
   (top-k, k=1 text / k=10 multimodal) and under M-ORE's exp(-KL): mean T-Loc and M-Loc.
2. Teacher-forced against generated answers, FT with and without the end token in its edit
   target (``editor.append_eos``): Rel., T-Gen., M-Gen. (and Port.) both ways, with F1.
3. DE-VQA locality sets against the standard M-Loc for the same FT edits.
4. Evaluation cost per edit of ``eval.mode`` generate and both against teacher_forced (single-edit
   protocol, the same FT edits; model forwards and batched generations per edit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import fmean

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spine import load  # noqa: E402
from mmke.editors.ft import FineTune  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import LOCALITY_SET_NAMES, POSITIONS, MetricSpec  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402


def mean_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return 100 * fmean(values) if values else float("nan")


def scored_edits(backbone, source, records, specs: dict[str, MetricSpec],
                 editor: FineTune) -> dict[str, list[dict]]:
    """Each record edited once and scored by every evaluator in ``specs`` on that same state."""
    editor.attach(backbone, source.templates)
    evaluators = {name: Evaluator(spec, source.templates) for name, spec in specs.items()}
    refs = {name: ev.references(backbone, records) for name, ev in evaluators.items()}
    rows: dict[str, list[dict]] = {name: [] for name in specs}
    for i, record in enumerate(records):
        if not editor.edit([record]).ok:
            editor.restore()
            continue
        for name, ev in evaluators.items():
            rows[name] += ev.evaluate(editor, [record], [refs[name][i]])
        editor.restore()
    return rows


def bench_conventions(backbone, source, records) -> None:
    specs = {p: MetricSpec(loc_positions=p) for p in POSITIONS}
    specs["kl (first)"] = MetricSpec(locality="kl", loc_positions="first")
    rows = scored_edits(backbone, source, records, specs, FineTune())
    print(f"[locality conventions] FT, {len(records)} single edits on {backbone.name}, "
          f"{source.name}")
    print(f"  {'convention':<12} {'T-Loc':>7} {'M-Loc':>7}")
    for name, r in rows.items():
        print(f"  {name:<12} {mean_of(r, 't_loc'):7.2f} {mean_of(r, 'm_loc'):7.2f}")


def bench_generated(backbone, source, records) -> None:
    spec = MetricSpec(mode="both", locality_sets=LOCALITY_SET_NAMES)
    print(f"[teacher-forced vs generated] FT, {len(records)} single edits, eval.mode=both, "
          f"max_new_tokens={spec.max_new_tokens}")
    keys = ["rel", "t_gen", "m_gen", "port", "t_loc", "m_loc"]
    print(f"  {'FT setting':<18} {'scoring':<16} " + " ".join(f"{k:>7}" for k in keys))
    for append_eos in (False, True):
        rows = scored_edits(backbone, source, records, {"both": spec},
                            FineTune(append_eos=append_eos))["both"]
        label = f"append_eos={str(append_eos).lower()}"
        for scoring, suffix in (("teacher-forced", ""), ("greedy EM", "_greedy"),
                                ("greedy F1", "_greedy_f1")):
            cells = [mean_of(rows, k + suffix) for k in keys]
            print(f"  {label:<18} {scoring:<16} " + " ".join(f"{c:7.2f}" for c in cells))
        answers = [r["rel_answer"] for r in rows[:3]]
        print(f"  {'':<18} first answers: {answers}")
        if not append_eos:
            sets = ["m_loc", *[f"loc_{s}" for s in LOCALITY_SET_NAMES]]
            print("  locality sets (teacher-forced, append_eos=false): "
                  + ", ".join(f"{k} {mean_of(rows, k):.2f}" for k in sets))


def bench_cost(backbone, source, records) -> None:
    print(f"[evaluation cost] FT, {len(records)} single edits, per edit (single protocol)")
    base = None
    for mode in ("teacher_forced", "generate", "both"):
        editor = FineTune()
        editor.attach(backbone, source.templates)
        evaluator = Evaluator(MetricSpec(mode=mode), source.templates)
        start = time.perf_counter()
        rows = SingleEdit().run(editor, evaluator, records, lambda row: None, progress=False)
        wall = time.perf_counter() - start
        eval_ms = 1000 * fmean(r["eval_s"] for r in rows)
        base = base or eval_ms
        n = len(records)
        print(f"  {mode:<15} eval {eval_ms:7.1f} ms/edit ({eval_ms / base:4.1f}x)  "
              f"forwards/edit {evaluator.forwards / n:4.2f}  generations/edit "
              f"{evaluator.generations / n:4.2f}  run {wall:6.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50)
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--backbone", default="tiny_blip2")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["conventions", "generated", "cost"])
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    backbone, source = load([f"backbone={args.backbone}", f"data={args.data}"])
    records = source.records("eval", limit=args.records)
    # Warm-up: decode every picture once, so no section pays for it.
    evaluator = Evaluator(MetricSpec(locality_sets=LOCALITY_SET_NAMES), source.templates)
    backbone.prepare([i.prompt for r in records for i in evaluator.items(r)])
    if "conventions" not in args.skip:
        bench_conventions(backbone, source, records)
    if "generated" not in args.skip:
        bench_generated(backbone, source, records)
    if "cost" not in args.skip:
        bench_cost(backbone, source, records)


if __name__ == "__main__":
    main()
