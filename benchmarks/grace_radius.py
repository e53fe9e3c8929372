"""GRACE's per-family settings, chosen on the TRAIN split (issue 12). Prints; asserts nothing.

    python benchmarks/grace_radius.py [--backbone tiny_blip2] [--data mini_vqa] [--keys 200]
                                      [--edits 60] [--layer 2] [--eps 1.0]

1. Key geometry, per language layer and candidate eps_init. The queries are the wrapped module's
   input at the last prompt token, as GRACE keys them. Over ``--keys`` train records it prints the
   share of text and image rephrases inside a new entry's radius (what generalises), and the share
   of the record's locality prompts outside it. It also prints the share of records whose nearest
   other train prompt with another original answer lies outside (what must stay apart).
   conf/editor_backbone/grace_<backbone>.yaml takes the layer and radius with the most rephrases
   inside, while at least 95% of both of the others stay outside.
2. Value training at ``--layer`` / ``--eps``. For each ``replace`` / lr / steps setting: ``--edits``
   single edits of train records, each scored on its own edit prompt. It prints teacher-forced
   reliability and exact greedy answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spine import load  # noqa: E402
from mmke.data.prompts import edit_prompts  # noqa: E402
from mmke.editors.grace import Grace, pairwise_distances  # noqa: E402
from mmke.evaluation.answers import answer_exact  # noqa: E402
from mmke.evaluation.scoring import Need, score_prompts  # noqa: E402

RADII = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
VALUE_SETTINGS = [("key", 1.0, 50), ("key_onward", 1.0, 50), ("key_onward", 0.3, 50),
                  ("key_onward", 0.1, 50), ("key_onward", 0.1, 20)]
KINDS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")  # the order of edit_prompts


def key_geometry(backbone, source, n: int) -> None:
    records = source.records("train", limit=n)
    prompts = [edit_prompts(r, source.templates) for r in records]
    other_answer = torch.tensor([[a.pred != b.pred for b in records] for a in records])
    for layer in range(backbone.modules.num_language_layers):
        editor = Grace(layer=layer)
        editor.attach(backbone, source.templates)
        keys = {kind: editor.queries([p[i] for p in prompts]) for i, kind in enumerate(KINDS)}
        edit = keys["rel"]
        apart = {kind: (edit - keys[kind]).norm(dim=-1) for kind in KINDS[1:]}
        between = pairwise_distances(edit, edit).masked_fill(~other_answer, float("inf"))
        nearest_other = between.min(dim=1).values
        print(f"layer {layer} (keys: median norm {edit.norm(dim=-1).median():.2f})")
        for eps in RADII:
            local = ((apart["t_loc"] > eps) & (apart["m_loc"] > eps)).float().mean()
            print(f"  eps_init {eps:4}: text rephrase in {(apart['t_gen'] <= eps).float().mean():.2f}"
                  f"  image rephrase in {(apart['m_gen'] <= eps).float().mean():.2f}"
                  f"  locality out {local:.2f}"
                  f"  other answer out {(nearest_other > eps).float().mean():.2f}")


def value_training(backbone, source, n: int, layer: int, eps: float) -> None:
    records = source.records("train", limit=n)
    for replace, lr, steps in VALUE_SETTINGS:
        editor = Grace(layer=layer, eps_init=eps, replace=replace, lr=lr, steps=steps)
        editor.attach(backbone, source.templates)
        start, reliable, exact = time.perf_counter(), [], []
        for record in records:
            editor.edit([record])
            prompt = edit_prompts(record, source.templates)[0]
            out = score_prompts(editor.forward, backbone, [prompt], [Need()], "target")[0]
            reliable.append(out.target_correct.float().mean().item())
            exact.append(answer_exact(editor.generate([prompt], 8)[0], record.alt))
            editor.restore()
        print(f"replace {replace:10} lr {lr:3} steps {steps:2}: "
              f"reliability {100 * sum(reliable) / n:5.1f}  greedy exact {100 * sum(exact) / n:5.1f}"
              f"  ({(time.perf_counter() - start) / n * 1000:.0f} ms per edit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="tiny_blip2")
    parser.add_argument("--data", default="mini_vqa")
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--edits", type=int, default=60)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--eps", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone, source = load([f"backbone={args.backbone}", f"data={args.data}"])
    print(f"== key geometry: {args.keys} train records of {args.data} on {args.backbone}")
    key_geometry(backbone, source, args.keys)
    print(f"== value training: {args.edits} train edits at layer {args.layer}, eps_init {args.eps}")
    value_training(backbone, source, args.edits, args.layer, args.eps)


if __name__ == "__main__":
    main()
