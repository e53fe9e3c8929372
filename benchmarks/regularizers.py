"""ODEdit and ASAM on FT, on the tiny default and E-VQA-mini's held-out eval split (issue 10).
Prints figures; asserts nothing.

    python benchmarks/regularizers.py [--records 30] [--seeds 5] [--ablations]

1. Cost (ODEdit Table 6, ASAM Table 8): mean edit time, optimisation steps and peak memory per
   edit of FT+ODEdit and FT+ASAM against FT alone, and the ratios.
2. Quality over seeds (the regularizers' seeds: train-split samples, LAR starts; FT itself is
   deterministic): mean ± std of the five metrics, and the paired t-test of each regularized
   row against FT alone (``mmke.tables.stats.paired_ttest``, as the table builder does).
3. With ``--ablations``: ODEdit Table 3 variants and Table 4 generality alignments, ASAM Table 4
   variant sources and alignments, all on FT.

All settings are the configs' defaults; nothing here is tuned, and the eval split is only scored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import fmean, stdev

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spine import cache_dir, load  # noqa: E402
from mmke.editors.ft import FineTune  # noqa: E402
from mmke.evaluation.evaluator import METRICS, Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402
from mmke.regularizers.asam import ASAM  # noqa: E402
from mmke.regularizers.base import NoRegularizer, Regularizer  # noqa: E402
from mmke.regularizers.odedit import ODEdit  # noqa: E402
from mmke.tables.stats import paired_ttest  # noqa: E402

MakeReg = Callable[[int], Regularizer]


def run(backbone, source, records, train, make_reg: MakeReg, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    editor = FineTune(regularizer=make_reg(seed))
    editor.attach(backbone, source.templates, train_records=lambda: train)
    evaluator = Evaluator(MetricSpec(), source.templates)
    return SingleEdit().run(editor, evaluator, records, lambda row: None, progress=False)


def means(rows: list[dict]) -> dict[str, float]:
    ok = [r for r in rows if r["ok"]]
    out = {m: fmean(r[m] for r in ok) for m in METRICS}
    out.update(edit_s=fmean(r["edit_s"] for r in rows), steps=fmean(r["steps"] for r in rows),
               peak_mb=max((r["peak_mem_mb"] or 0.0) for r in rows), failed=len(rows) - len(ok))
    return out


def study(backbone, source, records, train, methods: dict[str, MakeReg], seeds: int,
          reference: str) -> None:
    results = {name: [means(run(backbone, source, records, train, make, s)) for s in range(seeds)]
               for name, make in methods.items()}
    print(f"  {'method':<22}" + "".join(f"{m:>16}" for m in METRICS) + f"{'failed':>8}")
    for name, per_seed in results.items():
        cells = []
        for m in METRICS:
            values = [r[m] for r in per_seed]
            spread = stdev(values) if len(values) > 1 else float("nan")
            cell = f"{fmean(values):6.2f}±{spread:4.2f}"
            if name != reference:
                p = paired_ttest(pd.Series(values), pd.Series([r[m] for r in results[reference]]))
                cell += "*" if p == p and p < 0.05 else " "
            cells.append(f"{cell:>16}")
        print(f"  {name:<22}" + "".join(cells) + f"{sum(r['failed'] for r in per_seed):8d}")
    print(f"  (* paired t-test against {reference}, p < 0.05, over {seeds} seeds)")


def bench_cost(backbone, source, records, train) -> None:
    print(f"[cost] {len(records)} single edits on {backbone.name}, {source.name}")
    base = None
    for name, make in (("FT", lambda s: NoRegularizer()), ("FT+ODEdit", lambda s: ODEdit(seed=s)),
                       ("FT+ASAM", lambda s: ASAM(seed=s))):
        run(backbone, source, records[:3], train, make, 0)  # warm-up: caches, pools, allocator
        m = means(run(backbone, source, records, train, make, 0))
        base = base or m
        print(f"  {name:<10} edit {1000 * m['edit_s']:7.1f} ms ({m['edit_s'] / base['edit_s']:4.1f}x)  "
              f"steps {m['steps']:5.2f}  ms/step {1000 * m['edit_s'] / m['steps']:6.1f} "
              f"({(m['edit_s'] / m['steps']) / (base['edit_s'] / base['steps']):4.1f}x)  "
              f"peak {m['peak_mb']:7.1f} MB ({m['peak_mb'] / base['peak_mb']:4.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", default="mini_vqa_heldout")
    parser.add_argument("--ablations", action="store_true")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    backbone, source = load([f"data={args.data}"])
    cache = str(cache_dir())  # simcse's encoder and embeddings
    records = source.records("eval", limit=args.records)
    train = source.records("train")
    bench_cost(backbone, source, records, train)
    print(f"[quality] FT vs FT+ODEdit vs FT+ASAM, {args.seeds} seeds")
    study(backbone, source, records, train,
          {"FT": lambda s: NoRegularizer(), "FT+ODEdit": lambda s: ODEdit(seed=s),
           "FT+ASAM": lambda s: ASAM(seed=s)}, args.seeds, "FT")
    if args.ablations:
        print("[ODEdit Table 3 / Table 4 on FT]")
        study(backbone, source, records, train,
              {"full": lambda s: ODEdit(seed=s),
               **{v: (lambda s, v=v: ODEdit(variant=v, seed=s)) for v in ("no_rel", "no_loc", "no_gen")},
               **{g: (lambda s, g=g: ODEdit(gen_align=g, seed=s))
                  for g in ("mmd_s_linear", "mmd_m_rbf", "contrast")}}, args.seeds, "full")
        print("[ASAM Table 4 on FT]")
        study(backbone, source, records, train,
              {"lar+rcsl": lambda s: ASAM(seed=s), "original": lambda s: ASAM(variants="original", seed=s),
               "simcse": lambda s: ASAM(variants="simcse", cache_dir=cache, seed=s),
               **{a: (lambda s, a=a: ASAM(align=a, seed=s)) for a in ("cosine", "l2")}},
              args.seeds, "lar+rcsl")


if __name__ == "__main__":
    main()
