"""WISE's per-family settings, chosen on the TRAIN split (issue 12). Prints; asserts nothing.

    python benchmarks/wise_settings.py [--backbone tiny_blip2] [--data mini_vqa] [--edits 30]
                                       [--stream 20]

For each candidate setting (``SETTINGS``, on top of conf/editor/wise.yaml, the 7B defaults):
``--edits`` single edits of train records, then one sequential stream of ``--stream`` train
records, each scored by the real evaluator on the train records' own prompts (Rel, T-Gen, M-Gen,
T-Loc, M-Loc). Each line also gives the edits' mean activation score, their threshold and the
largest score of an irrelevant (train out-of-scope) input after its edit, and the time per edit.
Eval records are never edited or scored here. conf/editor_backbone/wise_<backbone>.yaml takes,
among the settings with single and stream Rel >= 95, the one with the best T-Loc + M-Loc.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rows import (  # noqa: E402
    load_train, mean_row, train_edits_parser,
)
from mmke.editors.wise import WISE  # noqa: E402
from mmke.evaluation.evaluator import Evaluator  # noqa: E402
from mmke.evaluation.spec import MetricSpec  # noqa: E402
from mmke.protocols.sequential import Sequential  # noqa: E402
from mmke.protocols.single import SingleEdit  # noqa: E402

SETTINGS = [dict(layer=-1), dict(layer=-2), dict(layer=-3),
            dict(layer=-2, irrelevant_prompts=5), dict(layer=-2, irrelevant_prompts=20),
            dict(layer=-1, irrelevant_prompts=5), dict(layer=-1, irrelevant_prompts=20),
            dict(layer=-1, irrelevant_prompts=20, steps=20),
            dict(layer=-1, irrelevant_prompts=20, steps=30),
            dict(layer=-2, irrelevant_prompts=20, steps=20),
            dict(layer=-1, irrelevant_prompts=20, steps=20, mask_ratio=0.5),
            dict(layer=-1, irrelevant_prompts=50, steps=20),
            dict(layer=-1, irrelevant_prompts=20, steps=20, mask_ratio=0.5, save_freq=5,
                 merge_freq=10),
            dict(layer=-1, irrelevant_prompts=20, steps=20, mask_ratio=0.5, save_freq=5,
                 merge_freq=5, retrieve=True),
            dict(layer=-1, irrelevant_prompts=20, steps=20, mask_ratio=0.5, save_freq=1,
                 merge_freq=1, retrieve=True),
            dict(layer=-1, irrelevant_prompts=20, steps=20, mask_ratio=0.2, save_freq=5,
                 merge_freq=5, retrieve=True),
            # 16-17: the shipped builds' re-check (issue 24) put 8 and 11 above 10 on locality;
            # each with 10's mask
            dict(layer=-1, irrelevant_prompts=20, steps=30, mask_ratio=0.5),
            dict(layer=-1, irrelevant_prompts=50, steps=20, mask_ratio=0.5)]


def main() -> None:
    parser = train_edits_parser(__doc__)
    parser.add_argument("--stream", type=int, default=20)
    parser.add_argument("--only", type=int, nargs="*", help="indices of SETTINGS to run")
    args = parser.parse_args()
    backbone, source, train = load_train(args)
    # edited records from the end of the split; irrelevant prompts are drawn from all of it
    edited = train[-args.edits:]
    evaluator = Evaluator(MetricSpec(), source.templates)
    chosen = SETTINGS if args.only is None else [SETTINGS[i] for i in args.only]
    for setting in chosen:
        editor = WISE(**setting)
        editor.attach(backbone, source.templates, train_records=lambda: train)
        seen: list[dict[str, float]] = []
        edit = editor.edit

        def recorded(records, edit=edit, seen=seen):
            outcome = edit(records)
            seen.append(outcome.extra)
            return outcome

        editor.edit = recorded  # type: ignore[method-assign]
        start = time.perf_counter()
        single = SingleEdit().run(editor, evaluator, edited, sink=lambda row: None,
                                  progress=False)
        per_edit = (time.perf_counter() - start) / len(edited)
        acts = [s.get(k, float("nan")) for s in seen
                for k in ("edit_activation", "threshold", "irrelevant_activation_max")]
        act, eps, irr = (sum(acts[i::3]) / len(seen) for i in range(3))
        stream = Sequential(T=args.stream).run(editor, evaluator, edited[:args.stream],
                                               sink=lambda row: None, progress=False)
        print(f"{str(setting):40} single: {mean_row(single)}  act {act:5.1f} eps {eps:5.1f} "
              f"irr {irr:5.1f}  ({per_edit * 1000:.0f} ms/edit)")
        print(f"{'':40} stream: {mean_row(stream)}", flush=True)


if __name__ == "__main__":
    main()
