"""SERAC's fit on a tiny backbone with its default tiny settings, and its edit quality on the
eval split beside the unedited model's (issue 13's target: the fit under 10 minutes on 2 cores).

    python benchmarks/serac_fit.py [--backbone tiny_blip2] [--data mini_vqa] [--edits 100]
                                   [--stream 20] [--threads 2] [--cache DIR]

Builds the editor as ``python run.py editor=serac backbone=<backbone>`` composes it, fits it on
the whole train split into ``--cache`` (a fresh temporary folder by default, so it trains), prints
the fit time and the last losses, then Rel / T-Gen / M-Gen / T-Loc / M-Loc over ``--edits`` single
edits of eval records, and over sequential streams of ``--stream`` edits, beside the unedited
model's. It also prints how many of the scored prompts of each kind the classifier routed to
the counterfactual model. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import mean_row  # noqa: E402
from benchmarks.spine import cache_dir, load  # noqa: E402
from mmke.config import build  # noqa: E402
from mmke.data.prompts import edit_prompts  # noqa: E402
from mmke.editors.base import NoEdit  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from mmke.protocols.sequential import Sequential  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402

KINDS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


def composed_editor(backbone: str, data: str, cache: str, overrides: tuple[str, ...] = (),
                    progress: bool = True):
    """The editor as ``python run.py editor=serac backbone=... data=... <overrides>`` builds it,
    keeping its trained networks under ``cache``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=[f"paths.cache_dir={cache_dir()}", f"progress={progress}",
                                 "editor=serac", f"backbone={backbone}", f"data={data}",
                                 *overrides])
    return build(cfg.editor, cache_dir=cache), cfg.editor.training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="tiny_blip2")
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--stream", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="trained-networks cache (default: fresh)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone, source = load([f"backbone={args.backbone}", f"data={args.data}"])
    train = source.records("train")
    cache = args.cache or tempfile.mkdtemp(prefix="serac_fit_")
    editor, training = composed_editor(args.backbone, args.data, cache)
    editor.attach(backbone, source.templates, train_records=lambda: train)
    start = time.perf_counter()
    report = editor.fit(train)
    seconds = time.perf_counter() - start
    print(f"fit: {report.steps_run} steps ({dict(training)}) on {len(train)} train records in "
          f"{seconds:.0f} s with {args.threads} threads; trained now: {report.trained_now}; "
          f"last losses: { {k: round(v, 4) for k, v in report.last_losses.items()} }")

    records = source.records("eval", limit=args.edits)
    evaluator = Evaluator(MetricSpec(), source.templates)
    unedited = NoEdit()
    unedited.attach(backbone, source.templates)
    for label, model in (("unedited", unedited), ("serac", editor)):
        start = time.perf_counter()
        single = SingleEdit().run(model, evaluator, records, sink=lambda row: None, progress=False)
        per_edit = (time.perf_counter() - start) / len(records)
        print(f"{label:9} single ({len(records)} edits): {mean_row(single)}  "
              f"({per_edit * 1000:.0f} ms/edit incl. scoring)")
        stream = Sequential(T=args.stream).run(model, evaluator, records, sink=lambda row: None,
                                               progress=False)
        print(f"{label:9} sequential T={args.stream}:      {mean_row(stream)}")

    routed = {k: 0 for k in KINDS}
    for record in records:
        editor.edit([record])
        prompts = edit_prompts(record, source.templates)
        for prompt, index in zip(prompts, editor.in_scope([editor.scope_text(p) for p in prompts])):
            routed[prompt.kind] += index is not None
        editor.restore()
    print("routed to the counterfactual model (single edits): "
          + "  ".join(f"{k} {100 * v / len(records):.0f}%" for k, v in routed.items()))


if __name__ == "__main__":
    main()
