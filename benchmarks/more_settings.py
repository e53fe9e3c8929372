"""M-ORE's per-family tiny settings, chosen on the TRAIN split (issue 11). Prints; asserts nothing.

    python benchmarks/more_settings.py [--backbone tiny_blip2] [--data mini_vqa] [--edits 20]

For each candidate setting (``SETTINGS``, on top of conf/editor/more.yaml with every language
layer of the tiny model): ``--edits`` single edits of train records, then the same records as one
online stream (M-ORE's protocol, ``eval=more`` metrics), scored on the train records' own prompts;
also the stream's retention (Rel. on the final model). Eval records are never edited or scored.
conf/editor_backbone/more_<backbone>.yaml takes the setting with the best online Avg. among those
whose online Rel. is at least 85.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import METRICS  # noqa: E402
from benchmarks.spine import load  # noqa: E402
from mmke.editors.more import MORE  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from mmke.protocols.online import Online  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402

SETTINGS = [dict(rank=r, eta=eta, lam=lam) for r in (32, 64) for eta in (0.3, 1.0, 3.0)
            for lam in (0.1, 1.0, 10.0)]


def means(rows: list[dict], keys: tuple[str, ...] = METRICS) -> dict[str, float]:
    return {m: sum(r[m] for r in rows) / len(rows) for m in keys}


def line(values: dict[str, float]) -> str:
    return "  ".join(f"{m} {v:5.1f}" for m, v in values.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="tiny_blip2")
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--edits", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone, source = load([f"backbone={args.backbone}", f"data={args.data}"])
    train = source.records("train")
    edited = train[-args.edits:]  # neighbours and out-of-scope prompts are drawn from all of it
    evaluator = Evaluator(MetricSpec(locality="kl", loc_positions="first"), source.templates)
    n_layers = backbone.modules.num_language_layers
    for setting in SETTINGS:
        editor = MORE(n_layers=n_layers, **setting)
        editor.attach(backbone, source.templates, train_records=lambda: train)
        start = time.perf_counter()
        single = SingleEdit().run(editor, evaluator, edited, sink=lambda row: None,
                                  progress=False)
        per_edit = (time.perf_counter() - start) / len(edited)
        online = Online(T=len(edited)).run(editor, evaluator, edited, sink=lambda row: None,
                                           progress=False)
        step = means(online)
        avg = sum(step.values()) / len(step)
        print(f"{str(setting):40} single: {line(means(single))}  ({per_edit * 1000:.0f} ms/edit)")
        print(f"{'':40} online: {line(step)}  avg {avg:5.1f}  "
              f"rel_final {means(online, ('rel_final',))['rel_final']:5.1f}")


if __name__ == "__main__":
    main()
